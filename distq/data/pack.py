"""``distq data pack ROOT --out SHARDS``: an ImageNet-layout folder as webdataset shards.

Each split becomes tar files of about ``shard_bytes`` each, written with the webdataset
library's ``TarWriter`` (fixed member times, so the same folder packs to the same bytes), plus
DALI's index file per tar and ``index.json`` (``distq.data.shards`` describes the layout),
written last: a folder without ``index.json`` is not a shards folder.

The training split is packed in a random order drawn from ``seed``, so that every shard holds
every class in proportion (a shard is what a reader takes its batches from); validation keeps
the folder order. Labels are the class-folder indices of the folder path (sorted folder names),
so shards and folders train with the same labels. Images are copied byte for byte, except
those the decoders may refuse (CMYK JPEGs and non-JPEG files named .JPEG), which are stored
re-encoded as RGB JPEGs (the source folder is not changed; ``distq data verify --fix`` fixes it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from distq.data.bundle import checked_class_names, class_name_table
from distq.data.folder import DataError, image_folder
from distq.data.shards import FORMAT, IMAGE, INDEX, LABEL, VERSION, write_dali_index
from distq.data.verify import needs_reencoding, rgb_jpeg_bytes
from distq.progress import Progress

DEFAULT_SHARD_BYTES = 10**9
READ_THREADS = 16
MEMBER_TIME = 946684800  # 2000-01-01: reproducible tar files
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'1GB', '500MB', '2GiB' or a number of bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and _UNITS.get(match[2].upper())
    if not match or unit is None or float(match[1]) <= 0:
        raise DataError(f"shard size {text!r} is not a size: write e.g. 1GB, 500MB or a number of bytes")
    return max(1, int(float(match[1]) * unit))


class _HashingFile:
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def _tar_components(path: Path) -> list[list[tuple[str, int, int, str]]]:
    """Per sample (members grouped by key, in tar order): (ext, data offset, size, member name)."""
    samples: list[list[tuple[str, int, int, str]]] = []
    last = None
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = member.name.split(".", 1)
            if key != last:
                samples.append([])
                last = key
            samples[-1].append((ext, member.offset_data, member.size, member.name))
    return samples


def _member_bytes(size: int) -> int:
    """A tar member's share of the archive: its header and its data padded to 512-byte blocks."""
    return tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _archive_bytes(members: int) -> int:
    """A tar archive's size from its members' bytes: two end blocks, then padding to a whole record."""
    return -(-(members + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class _ShardWriter:
    """Writes one split's shards, starting a new one when a sample would take it past ``shard_bytes``
    (a shard holds at least one sample)."""

    def __init__(self, out: Path, split: str, shard_bytes: int):
        self.out, self.split, self.shard_bytes = out, split, shard_bytes
        self.shards: list[dict] = []
        self.file = self.tar = None
        self.members = 0  # bytes of the open shard's members so far

    def write(self, key: str, label_text: str, image: bytes) -> None:
        import webdataset as wds

        size = _member_bytes(len(label_text)) + _member_bytes(len(image))
        if self.tar is not None and _archive_bytes(self.members + size) > self.shard_bytes:
            self.finish()
        if self.tar is None:
            name = f"{self.split}-{len(self.shards):06d}"
            self.file = _HashingFile(self.out / f"{name}.tar")
            self.tar = wds.TarWriter(self.file, mtime=MEMBER_TIME, encoder=False)
            self.shards.append({"tar": f"{name}.tar", "index": f"{name}.idx", "samples": 0})
            self.members = 0
        self.tar.write({"__key__": key, LABEL: label_text.encode(), IMAGE: image})
        self.shards[-1]["samples"] += 1
        self.members += size

    def finish(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.file.close()
        entry = self.shards[-1]
        entry.update(bytes=self.file.size, sha256=self.file.sha256.hexdigest())
        write_dali_index(self.out / entry["index"], _tar_components(self.out / entry["tar"]))
        self.tar = self.file = None


def _read_in_order(samples: list[tuple[str, int]], threads: int = READ_THREADS, window: int = 1024):
    """``(path, label, file bytes)`` in order, the files read ``threads`` at a time (a network file
    system serves many small reads at once far faster than one after the other), ``window`` ahead at most."""
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(samples), window):
            part = samples[start : start + window]
            yield from ((path, label, data) for (path, label), data in zip(part, pool.map(lambda s: Path(s[0]).read_bytes(), part)))


def pack(root: str | Path, out: str | Path, shard_bytes: int = DEFAULT_SHARD_BYTES, seed: int = 0, progress: bool = True) -> dict:
    """Pack ``root``'s train and val splits into ``out``; returns the index (``index.json``'s content)."""
    root, out = Path(root), Path(out)
    classes = checked_class_names(root)
    splits = {split: image_folder(root, split).samples for split in ("train", "val")}
    if (out / INDEX).is_file():
        raise DataError(f"{str(out)!r} already holds a complete pack ({INDEX}): delete it, or choose another --out, to pack again")
    if out.is_dir() and any(not re.fullmatch(rf"(train|val)-\d{{6}}\.(tar|idx)|\.{re.escape(INDEX)}\.tmp", p.name) for p in out.iterdir()):
        raise DataError(f"{str(out)!r} is not empty: choose an empty or new folder for --out")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():  # an interrupted pack's shards
        stale.unlink()
    digits = len(str(len(classes) - 1))
    index = {"format": FORMAT, "version": VERSION, "classes": classes, "label_digits": digits, "splits": {}, "seed": seed, "packed_from": str(root.resolve())}
    names = class_name_table(root)
    if names:
        index["class_names"] = names
    reencoded: dict[str, int] = {}
    for split, samples in splits.items():
        order = np.random.default_rng(seed).permutation(len(samples)) if split == "train" else np.arange(len(samples))
        width = max(6, len(str(len(samples) - 1)))
        writer = _ShardWriter(out, split, shard_bytes)
        bar = Progress(len(samples), f"pack {split}", every=max(1, len(samples) // 20), unit="image", enabled=progress)
        for number, (path, label, image) in enumerate(_read_in_order([samples[i] for i in order.tolist()])):
            oddity = needs_reencoding(image)
            if oddity:
                image = rgb_jpeg_bytes(image, path)
                reencoded[oddity] = reencoded.get(oddity, 0) + 1
            writer.write(f"{number:0{width}d}", f"{label:0{digits}d}", image)
            bar.update()
        writer.finish()
        bar.close()
        index["splits"][split] = {"samples": len(samples), "shards": writer.shards}
    if reencoded:
        index["reencoded"] = reencoded
    temporary = out / f".{INDEX}.tmp"
    temporary.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(temporary, out / INDEX)
    return index


def summary(index: dict, out: Path) -> list[str]:
    """What ``distq data pack`` prints when it is done."""
    lines = []
    for split, entry in index["splits"].items():
        shards = entry["shards"]
        size = sum(s["bytes"] for s in shards)
        lines.append(f"{split}: {entry['samples']} images in {len(shards)} shard(s), {size / 1e9:.3f} GB")
    for oddity, count in index.get("reencoded", {}).items():
        lines.append(f"stored re-encoded as RGB JPEG: {count} {oddity}(s) (fix the source with 'distq data verify ROOT --fix')")
    lines.append(f"wrote {out / INDEX}: train with data.format=shards data.root={out}")
    return lines
