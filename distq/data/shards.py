"""Sharded datasets (``data.format=shards``): webdataset tar files written by ``distq data pack``.

A shards folder holds, per split, tar files in the webdataset layout (sample ``KEY`` is the
members ``KEY.cls``, its class index as zero-padded decimal text, and ``KEY.jpg``, the image
file's bytes), DALI's index file for each (``wds2idx``'s format: one line per sample with each
component's offset and size), and ``index.json``, written last::

    {"format": "distq.shards", "version": 1, "classes": [...], "class_names": {...},
     "label_digits": 3, "splits": {"train": {"samples": N, "shards": [
        {"tar": "train-000000.tar", "index": "train-000000.idx", "samples": n, "bytes": b, "sha256": "..."}, ...]},
      "val": {...}}}

A sample's index is its position in its split's packed order (shard by shard). Loaders read
samples by offset, from the index files: the torchvision loader with ``os.pread`` and the
webdataset library's decoder, DALI's webdataset reader from index files listing the samples
of an epoch in the order to read them. Opening a folder checks that ``index.json`` and the
shards agree (files present, sizes, sample counts, every sample with its image and label) and
names the file of any mismatch in one line; ``distq data verify SHARDS`` also checks checksums
and, with ``--decode``, decodes every image.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distq.data.folder import (
    MAX_PIXELS,
    MAX_PIXELS_KEY,
    PERMISSION_DENIED,
    DataError,
    TooManyPixels,
    check_class_count,
    open_rgb,
    require_folder,
)

FORMAT = "distq.shards"
VERSION = 1
INDEX = "index.json"
IMAGE, LABEL = "jpg", "cls"
SPLITS = ("train", "val")
DALI_INDEX_VERSIONS = {"v1.0": 3, "v1.1": 3, "v1.2": 4}  # fields per component: ext offset size [name]
REPACK = "re-run distq data pack"


@dataclass(frozen=True)
class Shard:
    tar: Path
    index: Path
    samples: int
    bytes: int
    sha256: str


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{str(path)!r} not found: data.format=shards needs data.root to be a folder written by 'distq data pack ROOT --out SHARDS'")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{str(path)!r} is not valid JSON ({exc}): {REPACK}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError(f"{str(path)!r} is not a distq shards index (no \"format\": \"{FORMAT}\"): {REPACK}")
    if not isinstance(data.get("version"), int) or data["version"] > VERSION:
        raise DataError(f"{str(path)!r} has version {data.get('version')}, newer than this distq's ({VERSION}): use a newer distq")
    return data


def is_shards_folder(root: str | Path) -> bool:
    return (Path(root) / INDEX).is_file()


class ShardSplit:
    """One split of a shards folder: its shards, and where each sample's image and label lie.

    As a map-style dataset (``split[i]``) it decodes sample i with the webdataset library's
    decoder into ``(transform(image), label)``; an image larger than ``max_pixels`` is a
    ``DataError`` naming the sample and data.max_image_pixels."""

    def __init__(self, root: Path, name: str, entry: dict, num_classes: int, label_digits: int, transform=None, max_pixels: int = MAX_PIXELS):
        self.root, self.name, self.num_classes, self.label_digits, self.transform = root, name, num_classes, label_digits, transform
        self.max_pixels = max_pixels
        index_json = root / INDEX
        try:
            self.shards = [Shard(root / s["tar"], root / s["index"], int(s["samples"]), int(s["bytes"]), str(s["sha256"])) for s in entry["shards"]]
            declared = int(entry["samples"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{str(index_json)!r} lacks {exc} in split {name!r}: {REPACK}") from None
        if sum(s.samples for s in self.shards) != declared or not self.shards:
            raise DataError(f"{str(index_json)!r} says split {name!r} has {declared} samples but its shards list {sum(s.samples for s in self.shards)}: {REPACK}")
        self.starts = np.cumsum([0] + [s.samples for s in self.shards])
        columns = [self._check_shard(s) for s in self.shards]
        self.label_offset, self.image_offset, self.image_size = (np.concatenate(c) for c in zip(*columns))
        self.shard_of = np.repeat(np.arange(len(self.shards)), [s.samples for s in self.shards])
        self._files: dict[int, int] = {}
        self._pid = os.getpid()
        self._decoder = None

    @property
    def sizes(self) -> list[int]:
        return [s.samples for s in self.shards]

    def __len__(self) -> int:
        return int(self.starts[-1])

    # --- checks ------------------------------------------------------------------------------

    def _check_shard(self, shard: Shard) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Offsets of every sample's label and image, after checking the shard against index.json."""
        if not shard.tar.is_file():
            raise DataError(f"shard file {str(shard.tar)!r} listed in {INDEX} is missing: restore it or {REPACK}")
        size = shard.tar.stat().st_size
        if size != shard.bytes:
            raise DataError(f"shard file {str(shard.tar)!r} has {size} bytes, {INDEX} says {shard.bytes} (truncated or overwritten): restore it or {REPACK}")
        if not shard.index.is_file():
            raise DataError(f"index file {str(shard.index)!r} of shard {shard.tar.name} is missing: recreate it with 'wds2idx {shard.tar} {shard.index}' or {REPACK}")
        label_offset, label_size, image_offset, image_size = index_columns(shard)
        if len(label_offset) != shard.samples:
            raise DataError(f"{INDEX} says shard {str(shard.tar)!r} has {shard.samples} samples but its index file {shard.index.name} lists {len(label_offset)}: {REPACK}")
        bad = np.flatnonzero(label_size != self.label_digits)
        if len(bad):
            raise DataError(
                f"shard file {str(shard.tar)!r}: the label of sample number {bad[0]} has {label_size[bad[0]]} digits, "
                f"{INDEX} says {self.label_digits}: {REPACK}"
            )
        past = np.flatnonzero(np.maximum(label_offset + label_size, image_offset + image_size) > size)
        if len(past):
            raise DataError(f"index file {str(shard.index)!r}: sample number {past[0]} lies past the end of {shard.tar.name}: recreate the index or {REPACK}")
        return label_offset, image_offset, image_size

    # --- reading -----------------------------------------------------------------------------

    def locate(self, index: int) -> tuple[Shard, int]:
        """The shard holding sample ``index`` and the sample's position in it."""
        shard = int(self.shard_of[index])
        return self.shards[shard], index - int(self.starts[shard])

    def describe(self, index: int) -> str:
        shard, position = self.locate(index)
        return f"sample {sample_key(read_dali_index(shard.index)[position])} (number {position}) of shard file {str(shard.tar)!r}"

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a DataLoader worker: its own descriptors
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            try:
                self._files[shard] = os.open(self.shards[shard].tar, os.O_RDONLY)
            except PermissionError:
                raise DataError(f"shard file {str(self.shards[shard].tar)!r} cannot be read: {PERMISSION_DENIED}") from None
        return self._files[shard]

    def read_label(self, index: int) -> int:
        text = os.pread(self._fd(int(self.shard_of[index])), self.label_digits, int(self.label_offset[index]))
        label = int(text) if text.isdigit() else -1
        if not 0 <= label < self.num_classes:
            raise DataError(f"{self.describe(index)} has label {text!r}, not a class index 0..{self.num_classes - 1}: {REPACK}")
        return label

    def read(self, index: int) -> tuple[bytes, int]:
        """Sample ``index``'s image bytes and label."""
        label = self.read_label(index)
        image = os.pread(self._fd(int(self.shard_of[index])), int(self.image_size[index]), int(self.image_offset[index]))
        return image, label

    def decode(self, index: int):
        """Sample ``index`` as (RGB PIL image, label), decoded by the webdataset library's decoder
        with the folder path's image decoding (``open_rgb``: PIL, one conversion to RGB; the
        library's own image handler converts twice, 7% more CPU time)."""
        import webdataset as wds

        if self._decoder is None:
            self._decoder = wds.Decoder([wds.handle_extension(IMAGE, lambda data: open_rgb(io.BytesIO(data), self.max_pixels))])
        image, label = self.read(index)
        try:
            return self._decoder({"__key__": str(index), IMAGE: image})[IMAGE], label
        except wds.DecodingError as exc:
            cause = exc.__cause__ or exc
            if isinstance(cause, TooManyPixels):
                raise DataError(cause.explain(self.describe(index), MAX_PIXELS_KEY, f"shrink the image and {REPACK}")) from None
            raise DataError(f"{self.describe(index)} is corrupt or truncated ({cause}): replace the image and {REPACK}") from None

    def __getitem__(self, index: int):
        image, label = self.decode(index)
        return (self.transform(image) if self.transform else image), label

    def __getstate__(self):  # DataLoader workers open their own files
        return {**self.__dict__, "_files": {}, "_decoder": None}

    def close(self) -> None:
        """Close this process's shard files (they reopen on the next read)."""
        if self._pid == os.getpid():
            for fd in self._files.values():
                os.close(fd)
        self._files = {}

    def __del__(self):
        if hasattr(self, "_files"):
            self.close()

    # --- DALI --------------------------------------------------------------------------------

    def dali_index_files(self, order: list[int], folder: Path) -> tuple[list[str], list[str]]:
        """Tar files and index files that make DALI's webdataset reader read the samples
        ``order`` in that order: one (tar, index) pair per run of consecutive samples of one
        shard, the index listing the run's samples (DALI seeks to each by its offset)."""
        tars, indexes, lines = [], [], {}
        runs = np.split(np.asarray(order), np.flatnonzero(np.diff(self.shard_of[order])) + 1) if order else []
        for n, run in enumerate(runs):
            shard = int(self.shard_of[run[0]])
            if shard not in lines:
                lines[shard] = self.shards[shard].index.read_text().splitlines()
            header, rows = lines[shard][0], lines[shard][1:]
            path = folder / f"{n:06d}-{self.shards[shard].tar.stem}.idx"
            version = header.split()[0]
            body = "\n".join(rows[i] for i in (run - self.starts[shard]).tolist())
            path.write_text(f"{version} {len(run)}\n{body}\n")
            tars.append(str(self.shards[shard].tar))
            indexes.append(str(path))
        return tars, indexes


def index_columns(shard: Shard) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Label offsets and sizes, image offsets and sizes of every sample of a shard, from its
    index file; a sample without its label or image is a ``DataError`` naming the shard.

    distq's own shards list each sample's two components in the same order on every line,
    which is read column-wise (seconds for ImageNet's 1.28 million samples, where reading
    sample by sample took 30 s); other index files are read sample by sample."""
    text = shard.index.read_text() if shard.index.is_file() else ""
    lines = text.splitlines()
    fields = _check_header(shard.index, lines)
    first = lines[1].split() if len(lines) > 1 else []
    width = 2 * fields
    exts = first[0::fields]
    if len(first) == width and set(exts) == {IMAGE, LABEL} and all(line.count(" ") == width - 1 for line in lines[1:]):
        tokens = text.split()[2:]
        if set(tokens[0::width]) == {exts[0]} and set(tokens[fields::width]) == {exts[1]}:
            label, image = (0, fields) if exts[0] == LABEL else (fields, 0)
            return tuple(np.array(tokens[start::width], dtype=np.int64) for start in (label + 1, label + 2, image + 1, image + 2))
    columns = np.zeros((4, len(lines) - 1), dtype=np.int64)
    for i, sample in enumerate(read_dali_index(shard.index)):
        key = sample_key(sample)
        for ext, what in ((LABEL, "label"), (IMAGE, "image")):
            if ext not in sample:
                raise DataError(f"shard file {str(shard.tar)!r}: sample {key} has no {what} (no {key}.{ext}): {REPACK}")
        columns[:, i] = sample[LABEL][0], sample[LABEL][1], sample[IMAGE][0], sample[IMAGE][1]
    return columns[0], columns[1], columns[2], columns[3]


def _check_header(path: Path, lines: list[str]) -> int:
    """Fields per component of a DALI index file whose header and sample count are sound."""
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] not in DALI_INDEX_VERSIONS or not head[1].isdigit():
        raise DataError(f"index file {str(path)!r} does not start with a DALI index header (v1.2 <samples>): recreate it with wds2idx or {REPACK}")
    if int(head[1]) != len(lines) - 1:
        raise DataError(f"index file {str(path)!r} announces {head[1]} samples but lists {len(lines) - 1} (truncated?): recreate it with wds2idx or {REPACK}")
    return DALI_INDEX_VERSIONS[head[0]]


def sample_key(components: dict) -> str:
    name = next(iter(components.values()))[2]
    return name.split(".", 1)[0] if name else "?"


def read_dali_index(path: Path) -> list[dict[str, tuple[int, int, str]]]:
    """The samples of a DALI webdataset index file: ``{ext: (offset, size, member name)}`` each."""
    lines = path.read_text().splitlines()
    fields = _check_header(path, lines)
    samples = []
    for number, line in enumerate(lines[1:], 2):
        tokens = line.split()
        if not tokens or len(tokens) % fields:
            raise DataError(f"index file {str(path)!r} line {number} is malformed: recreate it with wds2idx or {REPACK}")
        sample = {}
        for c in range(0, len(tokens), fields):
            ext, offset, size = tokens[c], int(tokens[c + 1]), int(tokens[c + 2])
            sample[ext] = (offset, size, tokens[c + 3] if fields == 4 else "")
        samples.append(sample)
    return samples


def write_dali_index(path: Path, samples: list[list[tuple[str, int, int, str]]]) -> None:
    """Write DALI's index file (wds2idx's v1.2 format) of a tar whose samples have the given
    components ``(ext, data offset, size, member name)``, in tar order."""
    lines = [f"v1.2 {len(samples)}"] + [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in s) for s in samples]
    path.write_text("\n".join(lines) + "\n")


@dataclass
class ShardsFolder:
    """A shards folder opened and checked: class list, optional class names, splits."""

    root: Path
    classes: list[str]
    class_names: dict[str, str] | None
    label_digits: int
    splits: dict[str, dict]

    @classmethod
    def open(cls, root: str | Path) -> ShardsFolder:
        root = Path(root)
        fix = f"set data.root to the folder holding it, {root.parent}" if root.name == INDEX else "set data.root to a folder written by 'distq data pack'"
        require_folder(root, "shards folder", fix)
        data = _read_json(root / INDEX)
        try:
            classes, digits, splits = list(data["classes"]), int(data["label_digits"]), dict(data["splits"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{str(root / INDEX)!r} lacks {exc}: {REPACK}") from None
        missing = [s for s in SPLITS if s not in splits]
        if missing:
            raise DataError(f"{str(root / INDEX)!r} has no {missing[0]} split: pack a folder with train/ and val/ ({REPACK})")
        if not classes:
            raise DataError(f"{str(root / INDEX)!r} lists no classes: {REPACK}")
        check_class_count(classes, f"shards folder {str(root)!r}", f"pack a dataset folder with a class folder per class ({REPACK})")
        return cls(root, classes, data.get("class_names"), digits, splits)

    def split(self, name: str, transform=None, max_pixels: int = MAX_PIXELS) -> ShardSplit:
        return ShardSplit(self.root, name, self.splits[name], len(self.classes), self.label_digits, transform, max_pixels)
