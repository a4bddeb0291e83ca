"""Which config keys a resumed run may change.

A run is defined by its model, quantizer and bits, precision policies, guided training, data
and augmentation, seed, optimizer and schedule: a checkpoint resumed under other values would
continue a run nobody started, so a difference there is refused. What only says how long to
train, where and how to log, and how the processes run may change; each change is said.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAY_CHANGE = (
    "train.epochs",  # extends (or ends) the run; the schedules stretch over the new length
    "train.global_batch",  # checked against the checkpoint's by resume_layout
    "train.compile",
    "train.on_nonfinite",
    "train.max_skipped_steps",
    "run.",
    "log.",
    "dist.",
    "data.root",  # the same classes are checked when the checkpoint is loaded
    "data.format",
    "data.loader",
    "data.workers",
    "data.batch_size",  # the micro-batch; the global batch is the checkpoint's
    "data.max_image_pixels",
    "quant.kernels",  # bit-identical implementations
    "model.pretrained",  # the starting point: a resumed run starts from its checkpoint
    "guided.guide_pretrained",
)


@dataclass
class ConfigChanges:
    refused: list[str] = field(default_factory=list)
    """``key: checkpoint VALUE, now VALUE`` for each key that defines the run."""
    applied: list[str] = field(default_factory=list)
    """``key: VALUE -> VALUE`` for each key that may change."""


def flatten(tree, prefix: str = "") -> dict:
    """Nested config dicts as dotted keys; lists and scalars are values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE)


def config_changes(saved: dict, current: dict) -> ConfigChanges:
    """The differences between a checkpoint's config and the config resuming it."""
    old, new = flatten(saved), flatten(current)
    changes = ConfigChanges()
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, "(absent)"), new.get(key, "(absent)")
        if before == after:
            continue
        if may_change(key):
            changes.applied.append(f"{key}: {before} -> {after}")
        else:
            changes.refused.append(f"{key}: checkpoint {before}, now {after}")
    return changes
