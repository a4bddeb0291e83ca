"""What every loader gives the trainer, and the helpers both loaders share.

A train loader yields ``(images, labels, indices)`` micro-batches (``indices``: the samples'
positions in the training split, for the per-sample log) and is told each epoch where to
start (``set_epoch(epoch, start_step)``); its order is ``distq.data.order``'s. A val loader
yields ``(images, labels)`` from this rank's shard: over all ranks every image once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distq.config.schema import DataConfig
from distq.data.digits import ensure_digits
from distq.data.folder import CLASS_NAMES, DataError, class_names


@dataclass
class DataBundle:
    train: Any
    val: Any
    classes: list[str]
    root: Path

    def start_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Prepare the train loader for ``epoch`` from optimizer step ``start_step`` (a
        mid-epoch resume leaves out the steps already trained)."""
        self.train.set_epoch(epoch, start_step)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**62)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one sample's augmentation: the same whatever the rank, worker or resume point."""
    return epoch_seed(seed, epoch) + 104_729 * index


def resolve_root(cfg: DataConfig) -> Path:
    return Path(cfg.root) if cfg.root is not None else ensure_digits()


def checked_class_names(root: Path) -> list[str]:
    """The class list, after checking val/ has the same class folders as train/ (the
    label of a val image is its folder's index, so a missing folder would shift labels)."""
    classes = class_names(root)
    val_classes = sorted(p.name for p in (root / "val").iterdir() if p.is_dir()) if (root / "val").is_dir() else []
    if val_classes and val_classes != classes:
        missing = sorted(set(classes) ^ set(val_classes))
        raise DataError(f"{root}/train and {root}/val have different class folders ({', '.join(missing[:5])}): give both the same classes")
    return classes


def dataset_classes(cfg: DataConfig, root: Path) -> list[str]:
    """The class list (label i is class i) of the dataset at ``root`` in ``cfg.format``."""
    if cfg.format == "shards":
        from distq.data.shards import ShardsFolder

        return ShardsFolder.open(root).classes
    return checked_class_names(root)


def check_layout_fits(num_samples: int, global_batch: int, folder: Path) -> None:
    if num_samples < global_batch:
        raise DataError(
            f"{folder} has {num_samples} training images, fewer than one global batch of {global_batch}: "
            "lower data.batch_size (or train.global_batch)"
        )


def class_name_table(root: str | Path | None) -> dict[str, str] | None:
    """``{class: readable name}`` of a dataset folder or shards folder, if it has one."""
    if root is None:
        return None
    from distq.data.shards import INDEX

    root = Path(root)
    try:
        if (root / INDEX).is_file():
            return json.loads((root / INDEX).read_text()).get("class_names")
        if (root / CLASS_NAMES).is_file():
            return dict(json.loads((root / CLASS_NAMES).read_text()))
    except (ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"the class-name table of {str(root)!r} is not valid JSON ({exc}): fix or delete {CLASS_NAMES}") from None
    return None
