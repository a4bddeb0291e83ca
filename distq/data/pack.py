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

Every image is decoded as it is packed (``verify.examine``: every byte read and decoded), unless
``decode=False``: a file that does not decode, cannot be read or is larger than the pixel limit
stops the pack with one line naming how many and the first few, and nothing written (the shards
written so far are deleted, and ``out`` with them if the pack created it).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from distq.data.bundle import checked_class_names, class_name_table
from distq.data.folder import MAX_PIXELS, DataError, image_folder
from distq.data.shards import FORMAT, IMAGE, INDEX, LABEL, VERSION, write_dali_index
from distq.data.verify import (
    CANNOT_OPEN,
    DOES_NOT_DECODE,
    GRAYSCALE,
    TOO_LARGE,
    UNREADABLE,
    Problem,
    examine,
    needs_reencoding,
    rgb_jpeg_bytes,
)
from distq.progress import Progress

DEFAULT_SHARD_BYTES = 10**9
READ_THREADS = 16
MEMBER_TIME = 946684800  # 2000-01-01: reproducible tar files
LISTED = 3  # files named in the error line of a refused pack
PACK_FILE = re.compile(rf"(train|val)-\d{{6}}\.(tar|idx)|\.{re.escape(INDEX)}\.tmp")
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


def _load(path: str, decode: bool, max_pixels: int) -> tuple[bytes | None, str | None, Problem | None]:
    """(file bytes, oddity to store re-encoded, problem) of one image file; decoded unless ``decode`` is false."""
    try:
        data = Path(path).read_bytes()
    except PermissionError:
        return None, None, (UNREADABLE, CANNOT_OPEN)
    except OSError as exc:  # removed since it was listed, or a directory by now
        return None, None, (DOES_NOT_DECODE, exc.strerror or str(exc))
    if not decode:
        return data, needs_reencoding(data), None
    odd, problem = examine(io.BytesIO(data), max_pixels)
    return data, None if odd in (None, GRAYSCALE) else odd, problem


def _read_in_order(samples: list[tuple[str, int]], decode: bool, max_pixels: int, threads: int = READ_THREADS, window: int = 1024):
    """``(path, label, file bytes, oddity, problem)`` (``_load``) in order, the files read and decoded
    ``threads`` at a time (a network file system serves many small reads at once far faster than one
    after the other; PIL decodes without holding the GIL), ``window`` ahead at most."""
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(samples), window):
            part = samples[start : start + window]
            loaded = pool.map(lambda sample: _load(sample[0], decode, max_pixels), part)
            yield from ((path, label, *rest) for (path, label), rest in zip(part, loaded))


def _check_out(out: Path) -> Path | None:
    """``out`` may be new, empty, or hold an interrupted pack's files; anything else is refused
    untouched. Returns the outermost folder the pack will create (None: ``out`` exists)."""
    if (out / INDEX).is_file():
        raise DataError(f"{str(out)!r} already holds a complete pack ({INDEX}): delete it, or choose another --out, to pack again")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {str(out)!r} is a file, expected a folder: choose an empty or new folder for --out")
    if out.is_dir() and any(not PACK_FILE.fullmatch(p.name) for p in out.iterdir()):
        raise DataError(f"{str(out)!r} is not empty: choose an empty or new folder for --out")
    created = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
    if created is not None and created.parent.exists() and not created.parent.is_dir():
        raise DataError(f"--out {str(out)!r} lies under {str(created.parent)!r}, which is a file: choose an empty or new folder for --out")
    return created


def _refusal(problems: list[tuple[str, Problem]], total: int, root: Path, out: Path) -> str:
    """The one line of a pack refused for image files it cannot use."""
    said = {DOES_NOT_DECODE: "does not decode ({})", UNREADABLE: "cannot be read: permission denied", TOO_LARGE: "is too large ({}, see --max-image-pixels)"}
    named = [f"{path!r} {said[kind].format(detail)}" for path, (kind, detail) in problems[:LISTED]]
    more = f" and {len(problems) - LISTED} more" if len(problems) > LISTED else ""
    kinds = {kind for _, (kind, _) in problems}
    advice = [
        text
        for kind, text in (
            (DOES_NOT_DECODE, "replace or delete the files that do not decode"),
            (UNREADABLE, "make the unreadable files readable (chmod a+r)"),
            (TOO_LARGE, "shrink the images that are too large, or raise --max-image-pixels"),
        )
        if kind in kinds
    ]
    return (
        f"{len(problems)} of the {total} images of {root} cannot be packed: {', '.join(named)}{more}: {'; '.join(advice)} "
        f"('distq data verify {root}' lists them all); nothing was written to {out}"
    )


def _remove_partial(out: Path, created: Path | None) -> None:
    """Delete what a failed pack wrote: its files in ``out``, and the folders it created."""
    if out.is_dir():
        for path in out.iterdir():
            if PACK_FILE.fullmatch(path.name):
                path.unlink()
    if created is not None:
        for folder in [out, *out.parents]:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
            if folder == created:
                break


def pack(
    root: str | Path,
    out: str | Path,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    seed: int = 0,
    progress: bool = True,
    decode: bool = True,
    max_pixels: int = MAX_PIXELS,
) -> dict:
    """Pack ``root``'s train and val splits into ``out``; returns the index (``index.json``'s content).
    ``decode``: decode every image and refuse the pack if one cannot be used (see the module's docstring)."""
    root, out = Path(root), Path(out)
    classes = checked_class_names(root)
    splits = {split: image_folder(root, split).samples for split in ("train", "val")}
    created = _check_out(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create --out {str(out)!r} ({exc.strerror}): choose a folder you can write to") from None
    for stale in out.iterdir():  # an interrupted pack's shards
        stale.unlink()
    try:
        return _pack(root, out, classes, splits, shard_bytes, seed, progress, decode, max_pixels)
    except BaseException:
        _remove_partial(out, created)
        raise


def _pack(root: Path, out: Path, classes: list[str], splits: dict, shard_bytes: int, seed: int, progress: bool, decode: bool, max_pixels: int) -> dict:
    digits = len(str(len(classes) - 1))
    index = {"format": FORMAT, "version": VERSION, "classes": classes, "label_digits": digits, "splits": {}, "seed": seed, "packed_from": str(root.resolve())}
    names = class_name_table(root)
    if names:
        index["class_names"] = names
    reencoded: dict[str, int] = {}
    problems: list[tuple[str, Problem]] = []  # once there is one, nothing more is written: the pack fails
    for split, samples in splits.items():
        order = np.random.default_rng(seed).permutation(len(samples)) if split == "train" else np.arange(len(samples))
        width = max(6, len(str(len(samples) - 1)))
        writer = _ShardWriter(out, split, shard_bytes)
        bar = Progress(len(samples), f"pack {split}", every=max(1, len(samples) // 20), unit="image", enabled=progress)
        for number, (path, label, image, oddity, problem) in enumerate(_read_in_order([samples[i] for i in order.tolist()], decode, max_pixels)):
            bar.update()
            if problem is not None:
                problems.append((path, problem))
            if problems:
                continue
            if oddity:
                image = rgb_jpeg_bytes(image, path, max_pixels)
                reencoded[oddity] = reencoded.get(oddity, 0) + 1
            writer.write(f"{number:0{width}d}", f"{label:0{digits}d}", image)
        writer.finish()
        bar.close()
        index["splits"][split] = {"samples": len(samples), "shards": writer.shards}
    if problems:
        raise DataError(_refusal(sorted(problems), sum(len(s) for s in splits.values()), root, out))
    if reencoded:
        index["reencoded"] = reencoded
    temporary = out / f".{INDEX}.tmp"
    temporary.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(temporary, out / INDEX)
    return index


def summary(index: dict, out: Path, decoded: bool = True) -> list[str]:
    """What ``distq data pack`` prints when it is done (``decoded``: whether it decoded the images)."""
    lines = []
    for split, entry in index["splits"].items():
        shards = entry["shards"]
        size = sum(s["bytes"] for s in shards)
        lines.append(f"{split}: {entry['samples']} images in {len(shards)} shard(s), {size / 1e9:.3f} GB")
    for oddity, count in index.get("reencoded", {}).items():
        lines.append(f"stored re-encoded as RGB JPEG: {count} {oddity}(s) (fix the source with 'distq data verify ROOT --fix')")
    if not decoded:
        lines.append(f"did not decode the images (--no-decode): a file that does not decode is packed as it is; check with 'distq data verify {out} --decode'")
    lines.append(f"wrote {out / INDEX}: train with data.format=shards data.root={out}")
    return lines
