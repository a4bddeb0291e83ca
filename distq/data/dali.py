"""Build the train/val loaders of a run with NVIDIA DALI (``data.loader=dali``).

Same interface, files and labels as the torchvision path (``loaders.py``); DALI only replaces
decoding and augmentation: ``mixed`` (nvJPEG) decoding and GPU operators when CUDA is
available, CPU operators (``device_id=None``) otherwise.

Files and labels come from torchvision's ``ImageFolder`` over the same folders, so both paths
read the same files with the same class indices (sorted class folders) and report the same
``DataError`` for a bad folder.

Determinism. DALI seeds its shuffling once per pipeline: ``random_shuffle`` permutes the file
list with a fixed internal seed, then draws samples from a 1024-sample buffer whose generator
runs on across epochs, and the reader moves to the next shard after each epoch. A resumed run
would start that sequence over and so see different batches than the uninterrupted run. This
module does not use it. Each epoch builds a fresh train pipeline over the files that
``DistributedSampler(seed, epoch, rank, world, drop_last=True)`` gives this rank (the sampler
of the torchvision path), in the sampler's order, with the augmentation seeded from
(seed, epoch, rank). Data order is therefore a pure function of (seed, epoch) and identical to
the torchvision path's, and a run resumed at an epoch boundary reads the same images in the
same order. The random crops and flips are drawn by DALI's own generator: reproducible from
run to run on the CPU (and expected to be with ``mixed`` decoding, where the crop windows are
drawn on the CPU too, though that is untested), but different from the torchvision path's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

from distq.config.schema import DataConfig
from distq.data.folder import DataError, image_folder, load_rgb
from distq.data.loaders import DataBundle, checked_class_names, epoch_seed, resolve_root
from distq.data.transforms import IMAGENET_MEAN, IMAGENET_STD, val_resize_size
from distq.errors import DistqError

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except ImportError as exc:  # DALI is a Linux-only dependency
    raise DistqError(
        f"data.loader=dali needs NVIDIA DALI ({exc}): pip install nvidia-dali-cuda130 (Linux), or set data.loader=torchvision"
    ) from None

READER = "reader"
OUTPUTS = ["images", "labels"]
# crop_mirror_normalize works on 0-255 pixels; ToTensor + Normalize divide by 255 first.
MEAN_255 = [255.0 * m for m in IMAGENET_MEAN]
STD_255 = [255.0 * s for s in IMAGENET_STD]
# RandomResizedCrop's default aspect-ratio range.
ASPECT_RATIO = [3.0 / 4.0, 4.0 / 3.0]


# --- pipelines --------------------------------------------------------------------------------


def _normalize(images, **crop_or_mirror):
    """HWC uint8 -> CHW float ``(x / 255 - mean) / std``, as ToTensor + Normalize give."""
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=MEAN_255, std=STD_255, **crop_or_mirror)


@pipeline_def
def train_pipeline(files, labels, image_size, crop_scale, hflip, gpu):
    """RandomResizedCrop (fused with decoding: only the crop window is decoded) + flip + normalize."""
    jpegs, labels = fn.readers.file(files=files, labels=labels, random_shuffle=False, pad_last_batch=True, name=READER)
    images = fn.decoders.image_random_crop(
        jpegs,
        device="mixed" if gpu else "cpu",
        output_type=types.RGB,
        adjust_orientation=False,  # like PIL, which ignores EXIF orientation
        random_area=list(crop_scale),
        random_aspect_ratio=ASPECT_RATIO,
        num_attempts=10,
    )
    images = fn.resize(images, resize_x=image_size, resize_y=image_size)
    mirror = fn.random.coin_flip(probability=0.5) if hflip else 0
    return _normalize(images, mirror=mirror), labels.gpu() if gpu else labels


def _torchvision_val_geometry(images, image_size: int, resize_size: int):
    """Per-image ``Resize(resize_size)`` + ``CenterCrop(image_size)`` arithmetic as torchvision does it.

    torchvision truncates the longer side (``int(size * long / short)``) and rounds a half-pixel
    crop offset to even; DALI's own ``resize_shorter`` and centre crop round both differently,
    which shifts the crop by a pixel on many images. Returns resize_x, resize_y, crop_pos_x, crop_pos_y.
    """
    shape = images.shape(dtype=types.INT64)  # H, W, C
    height, width = shape[0], shape[1]
    shorter = dmath.min(height, width)
    sizes, positions = [], []
    for side in (width, height):
        resized = resize_size * side // shorter
        excess = resized - image_size
        offset = excess // 2 + (excess % 4 == 3)  # round(excess / 2), halves to even
        sizes.append(fn.cast(resized, dtype=types.FLOAT))
        positions.append(offset / dmath.max(excess, 1))  # crop_mirror_normalize rounds it back to `offset`
    return (*sizes, *positions)


@pipeline_def
def val_pipeline(files, labels, image_size, resize_size, shard_id, num_shards, gpu):
    """Resize the shorter side, centre-crop, normalize; one shard per rank, the same one every epoch.

    ``jpeg_fancy_upsampling`` makes nvJPEG upsample chroma like libjpeg (PIL, DALI's CPU
    decoder), so validation accuracy does not depend on the loader.
    """
    jpegs, labels = fn.readers.file(
        files=files,
        labels=labels,
        shard_id=shard_id,
        num_shards=num_shards,
        stick_to_shard=True,
        pad_last_batch=True,
        name=READER,
    )
    images = fn.decoders.image(
        jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=False, jpeg_fancy_upsampling=True
    )
    resize_x, resize_y, crop_pos_x, crop_pos_y = _torchvision_val_geometry(images, image_size, resize_size)
    images = fn.resize(images, resize_x=resize_x, resize_y=resize_y)
    images = _normalize(images, crop=(image_size, image_size), crop_pos_x=crop_pos_x, crop_pos_y=crop_pos_y)
    return images, labels.gpu() if gpu else labels


# --- loaders ----------------------------------------------------------------------------------


def _device_id() -> int | None:
    """This process's GPU (the launcher sets it to the local rank), or None for CPU-only pipelines."""
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def _batches(
    open_iterator: Callable[[], DALIGenericIterator], files: list[str], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """DALI's ``[{"images", "labels"}]`` batches as ``(images, labels)`` with int64 labels of shape [N].

    ``files`` are the pipeline's files in reading order: when DALI fails to decode one (its
    error names the operator, not the file; the iterator already decodes when it is built),
    the culprit is looked up among the batches being read and reported as a one-line
    ``DataError``."""
    done = 0
    try:
        for (batch,) in open_iterator():
            labels = batch["labels"].reshape(-1).long()
            done += 1
            if labels.numel():  # a padded shard can end in a batch of padding only
                yield batch["images"], labels
    except RuntimeError as exc:
        if "decoders.image" not in str(exc):
            raise
        raise _decode_error(files[done * batch_size : (done + DECODE_LOOKAHEAD) * batch_size], exc) from None


DECODE_LOOKAHEAD = 4  # DALI's prefetch queue (2 batches by default) plus margin


def _decode_error(candidates: list[str], exc: RuntimeError) -> DataError:
    """The ``DataError`` naming the first of ``candidates`` that does not decode (by PIL)."""
    for path in candidates:
        try:
            load_rgb(path)
        except DataError as bad:
            return bad
    failure = next((line for line in str(exc).splitlines() if "failure" in line), "decoding failed")
    folder = Path(candidates[0]).parent.parent if candidates else "the dataset"
    return DataError(
        f"DALI could not decode an image under {folder} ({failure.strip()}): "
        "run with data.loader=torchvision, which names the bad file"
    )


@dataclass
class _Split:
    """Files and labels of one split, as torchvision's ImageFolder lists them."""

    files: list[str]
    labels: list[int]

    @classmethod
    def read(cls, root: Path, split: str) -> _Split:
        samples = image_folder(root, split).samples
        return cls([path for path, _ in samples], [label for _, label in samples])

    def __len__(self) -> int:
        return len(self.files)


class DaliTrainLoader:
    """One epoch of training batches per ``iter()``, a pure function of (seed, epoch, rank, world).

    Each rank reads the ``DistributedSampler(drop_last=True)`` share of the epoch, so every rank
    takes ``floor(floor(n / world) / batch_size)`` steps, like the torchvision path.
    """

    def __init__(self, cfg: DataConfig, split: _Split, seed: int, rank: int, world: int, device_id: int | None):
        self.cfg, self.split, self.rank, self.world, self.device_id = cfg, split, rank, world, device_id
        self.seed, self.epoch, self.skip = seed, 0, 0
        self.sampler = DistributedSampler(
            range(len(split)), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )

    def set_epoch(self, seed: int, epoch: int, skip_batches: int = 0) -> None:
        """Like the torchvision path: the order uses the build seed, the augmentation this one.
        ``skip_batches`` leaves out the epoch's first batches (mid-epoch resume); the
        remaining batches hold the same images, but their random crops are drawn anew."""
        self.seed, self.epoch, self.skip = seed, epoch, skip_batches * self.cfg.batch_size

    def __len__(self) -> int:
        return (len(self.sampler) - self.skip) // self.cfg.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(self.epoch)
        order = list(self.sampler)[self.skip :]
        files = [self.split.files[i] for i in order]
        labels = [self.split.labels[i] for i in order]
        return _batches(lambda: self._epoch_iterator(files, labels), files, self.cfg.batch_size)

    def _epoch_iterator(self, files: list[str], labels: list[int]) -> DALIGenericIterator:
        """A fresh pipeline over this epoch's files: seconds at most (1.6 s for 640k files on 2 CPU cores)."""
        pipe = train_pipeline(
            files=files,
            labels=labels,
            image_size=self.cfg.image_size,
            crop_scale=self.cfg.crop_scale,
            hflip=self.cfg.hflip,
            gpu=self.device_id is not None,
            batch_size=self.cfg.batch_size,
            num_threads=max(1, self.cfg.workers),
            device_id=self.device_id,
            seed=(epoch_seed(self.seed, self.epoch) + self.rank) % 2**31,
        )
        return DALIGenericIterator([pipe], OUTPUTS, reader_name=READER, last_batch_policy=LastBatchPolicy.DROP)


def reader_shard_size(num_files: int, shard_id: int, num_shards: int) -> int:
    """Files in shard ``shard_id`` of a DALI reader, without padding (DALI's sharding guide)."""
    return (shard_id + 1) * num_files // num_shards - shard_id * num_files // num_shards


class DaliValLoader:
    """Validation batches of this rank's shard; over all ranks every image is counted exactly once.

    The reader pads every shard to the same length by repeating its last image; the iterator's
    PARTIAL policy, told the real shard size through ``reader_name``, cuts the padding off, and
    a batch that held only padding is skipped.
    """

    def __init__(self, cfg: DataConfig, split: _Split, rank: int, world: int, device_id: int | None):
        self.cfg, self.split, self.rank, self.world, self.device_id = cfg, split, rank, world, device_id
        self.num_images = reader_shard_size(len(split), rank, world)
        self.batch_size = cfg.batch_size
        first = rank * len(split) // world  # the reader's shards are contiguous ranges of the list
        self.files = split.files[first : first + self.num_images]
        self.iterator: DALIGenericIterator | None = None  # built at the first validation

    def _open(self) -> DALIGenericIterator:
        """The shard's pipeline, built once (it resets itself after each pass)."""
        if self.iterator is None:
            cfg = self.cfg
            pipe = val_pipeline(
                files=self.split.files,
                labels=self.split.labels,
                image_size=cfg.image_size,
                resize_size=val_resize_size(cfg.image_size, cfg.val_crop_ratio),
                shard_id=self.rank,
                num_shards=self.world,
                gpu=self.device_id is not None,
                batch_size=cfg.batch_size,
                num_threads=max(1, cfg.workers),
                device_id=self.device_id,
            )
            self.iterator = DALIGenericIterator(
                [pipe], OUTPUTS, reader_name=READER, last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True
            )
        return self.iterator

    def __len__(self) -> int:
        return math.ceil(self.num_images / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return _batches(self._open, self.files, self.batch_size)


@dataclass
class DaliBundle(DataBundle):
    train: DaliTrainLoader
    val: DaliValLoader

    def start_epoch(self, seed: int, epoch: int, skip_batches: int = 0) -> None:
        self.train.set_epoch(seed, epoch, skip_batches)


def build_dali_loaders(cfg: DataConfig, seed: int, rank: int = 0, world: int = 1) -> DaliBundle:
    """DALI counterpart of ``build_torchvision_loaders``: same files, labels, shards and steps."""
    root = resolve_root(cfg)
    classes = checked_class_names(root)
    device_id = _device_id()
    train = DaliTrainLoader(cfg, _Split.read(root, "train"), seed, rank, world, device_id)
    if len(train.sampler) < cfg.batch_size:
        raise DataError(
            f"data.batch_size={cfg.batch_size} is larger than each rank's share of {root / 'train'} "
            f"({len(train.sampler)} images on each of {world} ranks): lower data.batch_size"
        )
    val = DaliValLoader(cfg, _Split.read(root, "val"), rank, world, device_id)
    return DaliBundle(train=train, val=val, classes=classes, root=root)
