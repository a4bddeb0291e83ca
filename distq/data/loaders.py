"""Build the train/val loaders of a run (torchvision path).

Data order is a pure function of (seed, epoch) (a seeded ``DistributedSampler``), and
each sample's augmentation a pure function of (seed, epoch, index): the RNG is seeded
per sample, so it does not depend on the worker count or on where a run was resumed.
A run resumed mid-epoch skips the batches it already trained on and then sees exactly
the batches the uninterrupted run saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from distq.config.schema import DataConfig
from distq.data.digits import ensure_digits
from distq.data.folder import DataError, class_names, image_folder
from distq.data.transforms import train_transform, val_transform


class ShardSampler(Sampler[int]):
    """Rank r takes indices r, r + world, ... : every image exactly once over all ranks."""

    def __init__(self, length: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededSamples(Dataset):
    """Draws each sample's augmentation from the RNG seeded with (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        # The CPU generator only: torch.manual_seed also queues a lazy CUDA seed with a captured
        # stack trace on every call, which doubled the digits' loading time on a CPU machine.
        torch.default_generator.manual_seed(epoch_seed(self.seed, self.epoch) + 104_729 * index)
        return self.dataset[index]


class ResumableSampler(Sampler[int]):
    """This rank's ``DistributedSampler`` order for the epoch, minus the first ``skip`` samples."""

    def __init__(self, sampler: DistributedSampler):
        self.sampler = sampler
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(self.sampler)[self.skip :])

    def __len__(self) -> int:
        return len(self.sampler) - self.skip


@dataclass
class DataBundle:
    train: DataLoader
    val: DataLoader
    classes: list[str]
    root: Path

    def start_epoch(self, seed: int, epoch: int, skip_batches: int = 0) -> None:
        """Prepare the train loader for ``epoch``, leaving out its first ``skip_batches``
        batches (already trained on before a mid-epoch checkpoint)."""
        self.train.dataset.epoch = epoch
        self.train.sampler.set_epoch(epoch, skip_batches * self.train.batch_size)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**62)


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


def build_val_loader(cfg: DataConfig, root: Path, rank: int = 0, world: int = 1) -> DataLoader:
    val_set = image_folder(root, "val", val_transform(cfg.image_size, cfg.val_crop_ratio))
    return DataLoader(
        val_set,
        batch_size=cfg.batch_size,
        sampler=ShardSampler(len(val_set), rank, world),
        num_workers=cfg.workers,
    )


def build_loaders(cfg: DataConfig, seed: int, rank: int = 0, world: int = 1) -> DataBundle:
    """The configured loader pair (``data.loader``), sharded over ``world`` ranks."""
    if cfg.loader == "dali":
        from distq.data.dali import build_dali_loaders

        return build_dali_loaders(cfg, seed, rank, world)
    return build_torchvision_loaders(cfg, seed, rank, world)


def build_torchvision_loaders(cfg: DataConfig, seed: int, rank: int = 0, world: int = 1) -> DataBundle:
    root = resolve_root(cfg)
    classes = checked_class_names(root)
    train_set = SeededSamples(image_folder(root, "train", train_transform(cfg.image_size, cfg.crop_scale, cfg.hflip)), seed)
    sampler = ResumableSampler(DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True))
    train = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
    )
    return DataBundle(train=train, val=build_val_loader(cfg, root, rank, world), classes=classes, root=root)
