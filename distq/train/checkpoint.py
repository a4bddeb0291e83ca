"""Checkpoint files: atomic writes, validated reads, ``--resume auto`` lookup."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from distq.errors import DistqError

FORMAT_VERSION = 1
LAST = "last.pt"


class CheckpointError(DistqError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file, fsync, then rename over ``path``: a crash at any
    moment leaves either the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a failed write (disk full, Ctrl-C) leaves no partial file behind
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(state: dict, run_dir: str | Path, epoch: int, keep: int) -> Path:
    """Save ``state`` as ``last.pt`` (and ``epoch_NNNN.pt`` when keeping history)."""
    folder = checkpoint_dir(run_dir)
    state = {"format": FORMAT_VERSION, **state}
    last = folder / LAST
    atomic_write(last, lambda f: torch.save(state, f))
    if keep > 0:
        atomic_write(folder / f"epoch_{epoch:04d}.pt", lambda f: torch.save(state, f))
        for old in sorted(folder.glob("epoch_*.pt"))[:-keep]:
            old.unlink()
    return last


def find_resume(run_dir: str | Path) -> Path | None:
    last = checkpoint_dir(run_dir) / LAST
    return last if last.is_file() else None


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found: pass a file written by 'distq train' (RUN_DIR/checkpoints/last.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file (IndexError for an empty one, KeyError, OSError, ...)
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a distq checkpoint ({reason})") from None
    if not isinstance(state, dict) or "models" not in state or "config" not in state:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a distq training checkpoint (no models/config entries)")
    if state.get("format", 0) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format {state['format']}, newer than this distq ({FORMAT_VERSION}): upgrade distq")
    return state


def load_weights(model: nn.Module, state_dict: dict, source: str, *, allow_missing_quant_state: bool = False) -> None:
    """Load ``state_dict`` into ``model`` or say exactly why it does not fit.

    ``allow_missing_quant_state`` accepts a float state_dict (e.g. torchvision's) that
    lacks only the quantizers' ``_extra_state`` entries.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not (allow_missing_quant_state and k.endswith("_extra_state"))]
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
    model.load_state_dict(state_dict, strict=not allow_missing_quant_state)
