"""Build the train/val loaders of a run (torchvision path).

Data order and augmentation are pure functions of (seed, epoch): the sampler is
seeded with the run seed and told the epoch, and the loader's generator, which seeds
the workers' augmentation RNG, is re-seeded at every epoch. A run resumed at an epoch
boundary therefore sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from distq.config.schema import DataConfig
from distq.data.digits import ensure_digits
from distq.data.folder import class_names, image_folder
from distq.data.transforms import train_transform, val_transform


class ShardSampler(Sampler[int]):
    """Rank r takes indices r, r + world, ... : every image exactly once over all ranks."""

    def __init__(self, length: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class DataBundle:
    train: DataLoader
    val: DataLoader
    classes: list[str]
    root: Path

    def start_epoch(self, seed: int, epoch: int) -> None:
        self.train.sampler.set_epoch(epoch)
        self.train.generator.manual_seed(epoch_seed(seed, epoch))


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63)


def resolve_root(cfg: DataConfig) -> Path:
    return Path(cfg.root) if cfg.root is not None else ensure_digits()


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
    classes = class_names(root)
    train_set = image_folder(root, "train", train_transform(cfg.image_size, cfg.crop_scale, cfg.hflip))
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    train = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        drop_last=True,
        generator=torch.Generator(),
        pin_memory=torch.cuda.is_available(),
    )
    return DataBundle(train=train, val=build_val_loader(cfg, root, rank, world), classes=classes, root=root)
