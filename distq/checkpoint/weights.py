"""Loading a state_dict into a model, or saying exactly why it does not fit."""

from __future__ import annotations

import torch
import torch.nn as nn

from distq.checkpoint.manifest import CheckpointError


def load_weights(model: nn.Module, state_dict: dict, source: str, *, allow_missing_quant_state: bool = False, optional: frozenset[str] = frozenset()) -> None:
    """Load ``state_dict`` into ``model`` or say exactly why it does not fit.

    ``allow_missing_quant_state`` accepts a float state_dict (e.g. torchvision's) that
    lacks only the quantizers' ``_extra_state`` entries; ``optional`` names parameters that may
    be missing too (a quantizer method's own, set at the first step).
    """
    own = model.state_dict()
    missing = [
        k for k in own if k not in state_dict and k not in optional and not (allow_missing_quant_state and k.endswith("_extra_state"))
    ]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k} ({tuple(state_dict[k].shape)} vs {tuple(v.shape)})"
        for k, v in own.items()
        if k in state_dict and isinstance(v, torch.Tensor) and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"shape mismatch at {', '.join(mismatched[:3])}")
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else ""))
        raise CheckpointError(
            f"{source} does not fit this model ({'; '.join(parts)}): use a checkpoint of the same model.arch, width, stem and classes"
        )
    model.load_state_dict(state_dict, strict=not (allow_missing_quant_state or optional))
