"""Build the train/val loaders of a run with NVIDIA DALI (``data.loader=dali``).

Same interface, files and labels as the torchvision path (``loaders.py``); DALI only replaces
decoding and augmentation: ``mixed`` (nvJPEG) decoding and GPU operators when CUDA is
available, CPU operators (``device_id=None``) otherwise.

Files and labels come from torchvision's ``ImageFolder`` over the same folders, so both paths
read the same files with the same class indices (sorted class folders) and report the same
``DataError`` for a bad folder. With ``data.format=shards`` the reader is DALI's webdataset reader
(``read_webdataset``), given for each epoch index files that list this rank's samples of each
shard in the epoch's order (``ShardSplit.dali_index_files``): it seeks to exactly those samples.

Determinism. DALI seeds its random operators once per pipeline, not per sample, so its own
random crops would differ after a resume. Here nothing random is drawn inside DALI: the
train reader reads this rank's files in the order ``distq.data.order`` gives (the same as the
torchvision path's), and an external source feeds, batch by batch in step with the reader,
each sample's random numbers drawn from (seed, epoch, sample index). The crop window (area
and aspect ratio as RandomResizedCrop samples them, clamped to the image) and the flip are
computed from them in the pipeline, from the JPEG's size read from its header. So a run
resumed mid-epoch, or on another number of processes, crops every sample exactly as the
uninterrupted run did. The crops follow the same distribution as torchvision's but are not
the same windows (torchvision retries out-of-range draws instead of clamping).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distq.config.schema import DataConfig
from distq.data.bundle import DataBundle, check_layout_fits, dataset_classes, resolve_root
from distq.data.folder import DataError, image_folder, load_rgb
from distq.data.order import BatchLayout, EpochOrder
from distq.data.shards import IMAGE, LABEL, ShardsFolder, ShardSplit
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
VAL_OUTPUTS = ["images", "labels"]
TRAIN_OUTPUTS = ["images", "labels", "indices"]
# crop_mirror_normalize works on 0-255 pixels; ToTensor + Normalize divide by 255 first.
MEAN_255 = [255.0 * m for m in IMAGENET_MEAN]
STD_255 = [255.0 * s for s in IMAGENET_STD]
# RandomResizedCrop's default aspect-ratio range, as logarithms (it samples the ratio log-uniformly).
LOG_RATIO = (math.log(3.0 / 4.0), math.log(4.0 / 3.0))


# --- pipelines --------------------------------------------------------------------------------


def _normalize(images, **crop_or_mirror):
    """HWC uint8 -> CHW float ``(x / 255 - mean) / std``, as ToTensor + Normalize give."""
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=MEAN_255, std=STD_255, **crop_or_mirror)


def read_files(files: list[str], labels: list[int], **sharding) -> Callable:
    """The reader of image files with their labels, in the order given (``sharding``: shard_id, ...)."""
    return lambda: fn.readers.file(files=files, labels=labels, random_shuffle=False, pad_last_batch=True, name=READER, **sharding)


def read_webdataset(tars: list[str], indexes: list[str], label_digits: int, **sharding) -> Callable:
    """DALI's webdataset reader over ``tars`` as ``indexes`` list their samples: the image bytes
    and the label, parsed in the pipeline from its fixed-width decimal text (``distq.data.shards``)."""

    def read():
        jpegs, text = fn.readers.webdataset(
            paths=tars,
            index_paths=indexes,
            ext=[IMAGE, LABEL],
            missing_component_behavior="error",
            random_shuffle=False,
            pad_last_batch=True,
            name=READER,
            **sharding,
        )
        digits = fn.cast(text, dtype=types.INT64) - ord("0")
        label = digits[0]
        for i in range(1, label_digits):
            label = label * 10 + digits[i]
        return jpegs, label

    return read


@pipeline_def
def train_pipeline(read, draws, image_size, crop_scale, gpu):
    """RandomResizedCrop (fused with decoding: only the crop window is decoded) + flip + normalize.

    ``read()`` builds the reader (``read_files`` or ``read_webdataset``) of the epoch's samples;
    ``draws(batch_info)`` gives, per sample, 4 uniform numbers (area, log aspect ratio, x, y),
    the mirror flag and the sample's index, for the batch the reader reads at that iteration."""
    jpegs, labels = read()
    uniforms, mirror, indices = fn.external_source(source=draws, num_outputs=3, batch=True, batch_info=True)
    shape = fn.cast(fn.peek_image_shape(jpegs), dtype=types.FLOAT)  # H, W, C from the header
    height, width = shape[0], shape[1]
    low, high = crop_scale
    area = height * width * (low + uniforms[0] * (high - low))
    ratio = dmath.exp(LOG_RATIO[0] + uniforms[1] * (LOG_RATIO[1] - LOG_RATIO[0]))
    # Whole pixels, inside the image: the slice never reads out of bounds.
    crop_w = dmath.max(dmath.floor(dmath.min(dmath.sqrt(area * ratio), width)), 1.0)
    crop_h = dmath.max(dmath.floor(dmath.min(dmath.sqrt(area / ratio), height)), 1.0)
    anchor = fn.stack(dmath.floor(uniforms[2] * (width - crop_w)), dmath.floor(uniforms[3] * (height - crop_h)))
    images = fn.decoders.image_slice(
        jpegs,
        anchor,
        fn.stack(crop_w, crop_h),
        device="mixed" if gpu else "cpu",
        output_type=types.RGB,
        adjust_orientation=False,  # like PIL, which ignores EXIF orientation
        normalized_anchor=False,
        normalized_shape=False,
        axis_names="WH",
    )
    images = fn.resize(images, resize_x=image_size, resize_y=image_size)
    return _normalize(images, mirror=mirror), labels.gpu() if gpu else labels, indices


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
def val_pipeline(read, image_size, resize_size, gpu):
    """Resize the shorter side, centre-crop, normalize; ``read()`` builds the reader of this
    rank's shard of the split, the same one every epoch.

    ``jpeg_fancy_upsampling`` makes nvJPEG upsample chroma like libjpeg (PIL, DALI's CPU
    decoder), so validation accuracy does not depend on the loader.
    """
    jpegs, labels = read()
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


def _batches(open_iterator: Callable[[], DALIGenericIterator], outputs: list[str], source: _Source, samples: list[int], batch_size: int) -> Iterator[tuple]:
    """DALI's ``[{name: tensor}]`` batches as tuples in ``outputs`` order, labels (and indices)
    as int64 of shape [N].

    ``samples`` are the pipeline's samples in reading order: when DALI fails to decode one (its
    error names the operator, not the file; the iterator already decodes when it is built),
    the culprit is looked up among the batches being read and reported as a one-line
    ``DataError``."""
    done = 0
    try:
        for (batch,) in open_iterator():
            labels = batch["labels"].reshape(-1).long()
            done += 1
            if labels.numel():  # a padded shard can end in a batch of padding only
                yield (batch["images"], labels, *(batch[name].reshape(-1).long() for name in outputs[2:]))
    except RuntimeError as exc:
        if not any(op in str(exc) for op in DECODING_OPERATORS):
            raise
        raise _decode_error(source, samples[done * batch_size : (done + DECODE_LOOKAHEAD) * batch_size], exc) from None


DECODING_OPERATORS = ("decoders.image", "peek_image_shape")  # the operators that parse the files
DECODE_LOOKAHEAD = 4  # DALI's prefetch queue (2 batches by default) plus margin


def _decode_error(source: _Source, candidates: list[int], exc: RuntimeError) -> DataError:
    """The ``DataError`` naming the first of ``candidates`` that does not decode (by PIL)."""
    for index in candidates:
        try:
            source.check(index)
        except DataError as bad:
            return bad
    failure = next((line for line in str(exc).splitlines() if "failure" in line), "decoding failed")
    return DataError(
        f"DALI could not decode an image of {source.where} ({failure.strip()}): "
        "run with data.loader=torchvision, which names the bad file"
    )


class _Source:
    """One split's samples as a DALI reader sees them: ``len``, the reader of given samples in a
    given order (training), the reader of a rank's shard (validation), and ``check(index)``,
    which raises the ``DataError`` naming sample ``index`` if it does not decode."""

    where: str

    def __len__(self) -> int:
        raise NotImplementedError

    def reader(self, samples: list[int], workdir: Path) -> Callable:
        raise NotImplementedError

    def shard_reader(self, rank: int, world: int) -> Callable:
        raise NotImplementedError

    def check(self, index: int) -> None:
        raise NotImplementedError


@dataclass
class _Folder(_Source):
    """Files and labels of one split, as torchvision's ImageFolder lists them."""

    files: list[str]
    labels: list[int]
    where: str

    @classmethod
    def read(cls, root: Path, split: str) -> _Folder:
        samples = image_folder(root, split).samples
        return cls([path for path, _ in samples], [label for _, label in samples], str(root / split))

    def __len__(self) -> int:
        return len(self.files)

    def reader(self, samples: list[int], workdir: Path) -> Callable:
        return read_files([self.files[i] for i in samples], [self.labels[i] for i in samples])

    def shard_reader(self, rank: int, world: int) -> Callable:
        return read_files(self.files, self.labels, shard_id=rank, num_shards=world, stick_to_shard=True)

    def check(self, index: int) -> None:
        load_rgb(self.files[index])


class _Shards(_Source):
    """One split of a shards folder: the webdataset reader, told by index files which samples to read."""

    def __init__(self, split: ShardSplit):
        self.split, self.where = split, f"shards of {split.root}"

    def __len__(self) -> int:
        return len(self.split)

    def reader(self, samples: list[int], workdir: Path) -> Callable:
        return read_webdataset(*self.split.dali_index_files(samples, workdir), self.split.label_digits)

    def shard_reader(self, rank: int, world: int) -> Callable:
        tars, indexes = [str(s.tar) for s in self.split.shards], [str(s.index) for s in self.split.shards]
        return read_webdataset(tars, indexes, self.split.label_digits, shard_id=rank, num_shards=world, stick_to_shard=True)

    def check(self, index: int) -> None:
        self.split.decode(index)


class DaliTrainLoader:
    """One epoch of ``(images, labels, indices)`` training batches per ``iter()``: this rank's
    files in ``distq.data.order``'s order, each sample's crop and flip drawn from (seed, epoch,
    index)."""

    def __init__(self, cfg: DataConfig, split: _Source, order: EpochOrder, layout: BatchLayout, rank: int, device_id: int | None):
        self.cfg, self.split, self.order, self.layout, self.rank, self.device_id = cfg, split, order, layout, rank, device_id
        self.seed = order.seed
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.order.micro_batches(self.layout, self.start_step)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self.order.rank_samples(self.epoch, self.layout, self.rank, self.start_step)
        if not order:  # resumed after the epoch's last step: nothing left to read
            return iter(())
        return _batches(lambda: self._epoch_iterator(order), TRAIN_OUTPUTS, self.split, order, self.layout.micro_batch)

    def sample_draws(self, order: list[int]) -> Callable:
        """The external source: per batch, each sample's (area, ratio, x, y) uniforms, mirror flag
        and index; a pure function of (seed, epoch, index)."""
        rng = np.random.default_rng([self.seed, self.epoch, 0xD15C])
        uniforms = rng.random((len(self.split), 5), dtype=np.float32)  # per sample of the split: order-independent
        index = np.asarray(order, dtype=np.int64)
        mirror = (uniforms[index, 4] < 0.5).astype(np.int32) if self.cfg.hflip else np.zeros(len(index), np.int32)
        size, batches = self.layout.micro_batch, max(1, len(index) // self.layout.micro_batch)

        def draws(info):
            # The pipeline prefetches past the epoch's end; those batches are never read.
            rows = slice((info.iteration % batches) * size, (info.iteration % batches + 1) * size)
            picked = index[rows]
            return (
                list(uniforms[picked, :4]),
                list(mirror[rows].reshape(-1, 1)[:, 0]),
                list(picked.reshape(-1, 1)),
            )

        return draws

    def _epoch_iterator(self, order: list[int]) -> DALIGenericIterator:
        """A fresh pipeline over this epoch's samples: seconds at most (1.6 s for 640k files on 2 CPU cores)."""
        with tempfile.TemporaryDirectory(prefix="distq-dali-") as workdir:  # the reader reads its index files when built
            return self._build_iterator(self.split.reader(order, Path(workdir)), order)

    def _build_iterator(self, read: Callable, order: list[int]) -> DALIGenericIterator:
        pipe = train_pipeline(
            read=read,
            draws=self.sample_draws(order),
            image_size=self.cfg.image_size,
            crop_scale=self.cfg.crop_scale,
            gpu=self.device_id is not None,
            batch_size=self.layout.micro_batch,
            num_threads=max(1, self.cfg.workers),
            device_id=self.device_id,
            seed=self.seed % 2**31,  # no random operator uses it
        )
        pipe.build()
        return DALIGenericIterator([pipe], TRAIN_OUTPUTS, reader_name=READER, last_batch_policy=LastBatchPolicy.DROP)


def reader_shard_size(num_files: int, shard_id: int, num_shards: int) -> int:
    """Files in shard ``shard_id`` of a DALI reader, without padding (DALI's sharding guide)."""
    return (shard_id + 1) * num_files // num_shards - shard_id * num_files // num_shards


class DaliValLoader:
    """Validation batches of this rank's shard; over all ranks every image is counted exactly once.

    The reader pads every shard to the same length by repeating its last image; the iterator's
    PARTIAL policy, told the real shard size through ``reader_name``, cuts the padding off, and
    a batch that held only padding is skipped.
    """

    def __init__(self, cfg: DataConfig, split: _Source, rank: int, world: int, device_id: int | None):
        self.cfg, self.split, self.rank, self.world, self.device_id = cfg, split, rank, world, device_id
        self.num_images = reader_shard_size(len(split), rank, world)
        self.batch_size = cfg.batch_size
        first = rank * len(split) // world  # the reader's shards are contiguous ranges of the list
        self.samples = list(range(first, first + self.num_images))
        self.iterator: DALIGenericIterator | None = None  # built at the first validation

    def _open(self) -> DALIGenericIterator:
        """The shard's pipeline, built once (it resets itself after each pass)."""
        if self.iterator is None:
            cfg = self.cfg
            pipe = val_pipeline(
                read=self.split.shard_reader(self.rank, self.world),
                image_size=cfg.image_size,
                resize_size=val_resize_size(cfg.image_size, cfg.val_crop_ratio),
                gpu=self.device_id is not None,
                batch_size=cfg.batch_size,
                num_threads=max(1, cfg.workers),
                device_id=self.device_id,
            )
            self.iterator = DALIGenericIterator(
                [pipe], VAL_OUTPUTS, reader_name=READER, last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True
            )
        return self.iterator

    def __len__(self) -> int:
        return math.ceil(self.num_images / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return _batches(self._open, VAL_OUTPUTS, self.split, self.samples, self.batch_size)


def build_dali_loaders(cfg: DataConfig, seed: int, layout: BatchLayout, rank: int = 0) -> DataBundle:
    """DALI counterpart of ``build_torchvision_loaders``: same files, labels, order and shards."""
    root = resolve_root(cfg)
    classes = dataset_classes(cfg, root)
    device_id = _device_id()
    if cfg.format == "shards":
        shards = ShardsFolder.open(root)
        train_split, val_split = _Shards(shards.split("train")), _Shards(shards.split("val"))
        order = EpochOrder(len(train_split), seed, tuple(train_split.split.sizes))
    else:
        train_split, val_split = _Folder.read(root, "train"), _Folder.read(root, "val")
        order = EpochOrder(len(train_split), seed)
    check_layout_fits(len(train_split), layout.global_batch, root if cfg.format == "shards" else root / "train")
    train = DaliTrainLoader(cfg, train_split, order, layout, rank, device_id)
    val = DaliValLoader(cfg, val_split, rank, layout.world, device_id)
    return DataBundle(train=train, val=val, classes=classes, root=root)
