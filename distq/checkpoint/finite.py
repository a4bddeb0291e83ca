"""Finding NaN and infinite values in what is saved or loaded: a diverged run never reaches a
checkpoint, an export or an evaluation unnoticed."""

from __future__ import annotations

import torch

from distq.checkpoint.manifest import CheckpointError


class NonFiniteError(CheckpointError):
    """A model or optimizer state holds NaN or infinite values."""


def nonfinite_entries(obj, prefix: str = "") -> list[str]:
    """The dotted names of the floating-point tensors in ``obj`` (nested dicts, lists, tuples)
    that hold a NaN or an infinity, in the order found."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            return [] if bool(torch.isfinite(obj).all()) else [prefix or "tensor"]
        return []
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return []
    found = []
    for key, value in items:
        found += nonfinite_entries(value, f"{prefix}.{key}" if prefix else str(key))
    return found


def describe_nonfinite(names: list[str], limit: int = 3) -> str:
    """``"3 tensors hold NaN or inf values (conv1.weight, fc.bias, ...)"``."""
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''} hold{'s' if len(names) == 1 else ''} NaN or infinite values ({shown})"
