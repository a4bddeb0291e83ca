"""The torchvision train/val loaders (``data.loader=torchvision``): ImageFolder (or a shards
folder's samples, ``distq.data.shards``) + DataLoader.

Data order comes from ``distq.data.order`` (a pure function of seed, epoch and batch
layout), and each sample's augmentation from the RNG seeded with (seed, epoch, index), so it
does not depend on the worker count, the number of processes or where a run was resumed.
"""

from __future__ import annotations

import os
import signal
import threading

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from distq.config.schema import DataConfig
from distq.data.bundle import DataBundle, check_layout_fits, dataset_classes, resolve_root, sample_seed
from distq.data.folder import image_folder
from distq.data.order import BatchLayout, EpochOrder
from distq.data.shards import ShardsFolder
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
    """``(image, label, index)`` with the augmentation drawn from the RNG seeded with (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        # The CPU generator only: torch.manual_seed also queues a lazy CUDA seed with a captured
        # stack trace on every call, which doubled the digits' loading time on a CPU machine.
        torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
        image, label = self.dataset[index]
        return image, label, index


class EpochSampler(Sampler[int]):
    """This rank's samples of the epoch (``EpochOrder.rank_samples``), from ``start_step`` on."""

    def __init__(self, order: EpochOrder, layout: BatchLayout, rank: int):
        self.order, self.layout, self.rank = order, layout, rank
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        return iter(self.order.rank_samples(self.epoch, self.layout, self.rank, self.start_step))

    def __len__(self) -> int:
        return self.order.micro_batches(self.layout, self.start_step) * self.layout.micro_batch


class TorchvisionTrainLoader:
    """``(images, labels, indices)`` micro-batches of one epoch per ``iter()``."""

    def __init__(self, samples: SeededSamples, sampler: EpochSampler, cfg: DataConfig):
        self.samples, self.sampler = samples, sampler
        self.loader = DataLoader(
            samples,
            batch_size=sampler.layout.micro_batch,
            sampler=sampler,
            num_workers=cfg.workers,
            drop_last=True,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=leave_signals_to_the_trainer,
        )

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.samples.epoch = epoch
        self.sampler.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def build_val_loader(cfg: DataConfig, root, rank: int = 0, world: int = 1) -> DataLoader:
    transform = val_transform(cfg.image_size, cfg.val_crop_ratio)
    if cfg.format == "shards":
        val_set = ShardsFolder.open(root).split("val", transform, cfg.max_image_pixels)
    else:
        val_set = image_folder(root, "val", transform, cfg.max_image_pixels)
    return DataLoader(
        val_set, batch_size=cfg.batch_size, sampler=ShardSampler(len(val_set), rank, world), num_workers=cfg.workers,
        worker_init_fn=leave_signals_to_the_trainer,
    )


def leave_signals_to_the_trainer(worker_id: int) -> None:
    """In a loader worker: leave the pre-emption signals to the training process. SLURM sends
    SIGTERM (and, with ``scancel --full``, SIGUSR1) to every process of the job; a worker killed
    by it makes the training process fail before it can checkpoint. So the worker blocks both
    and a thread waits for them: sent by its own parent (the loader shutting it down, or Python's
    exit), it exits at once; sent by anyone else, it is ignored, and the worker ends
    when the training process stops it (or, as always, when that process is gone)."""
    parent = os.getppid()
    signals = {signal.SIGTERM, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)

    def wait() -> None:
        while True:
            if signal.sigwaitinfo(signals).si_pid == parent:
                os._exit(0)  # a clean exit: the loader takes any other as a crash

    threading.Thread(target=wait, name="distq-signals", daemon=True).start()


def build_torchvision_loaders(cfg: DataConfig, seed: int, layout: BatchLayout, rank: int = 0) -> DataBundle:
    """Folders: torchvision's ImageFolder; shards: samples read by offset and decoded by the
    webdataset library, in the sharded epoch order (``order.shard_order``)."""
    root = resolve_root(cfg)
    classes = dataset_classes(cfg, root)
    transform = train_transform(cfg.image_size, cfg.crop_scale, cfg.hflip)
    if cfg.format == "shards":
        train_set = ShardsFolder.open(root).split("train", transform, cfg.max_image_pixels)
        order = EpochOrder(len(train_set), seed, tuple(train_set.sizes))
    else:
        train_set = image_folder(root, "train", transform, cfg.max_image_pixels)
        order = EpochOrder(len(train_set), seed)
    check_layout_fits(len(train_set), layout.global_batch, root if cfg.format == "shards" else root / "train")
    train = TorchvisionTrainLoader(SeededSamples(train_set, seed), EpochSampler(order, layout, rank), cfg)
    return DataBundle(train=train, val=build_val_loader(cfg, root, rank, layout.world), classes=classes, root=root)
