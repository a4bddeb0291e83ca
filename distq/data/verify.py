"""``distq data verify ROOT [--fix]``: one report on an ImageNet-layout folder.

Counts images per split and class, decodes every image (names the files that do not decode,
that cannot be read, and the images larger than the pixel limit, which training refuses),
lists classes present in one split only, and the oddities ImageNet's training set is known to
hold and some decoders refuse: CMYK JPEGs, grayscale JPEGs, and PNG (or other) files saved as
.JPEG. ``--fix`` re-encodes the odd files as RGB JPEGs in place (each written to a temporary
file and renamed over the original, so an interruption never leaves half a file).

``distq data verify SHARDS [--decode]``: a shards folder against its index and checksums, and
with ``--decode`` every sample's image decoded as the folder's are.

Decoding uses PIL's reduced-size JPEG decoding (``draft``): every byte of the file is still
read and entropy-decoded, so a truncated or corrupt file fails as it would at full size.
"""

from __future__ import annotations

import functools
import io
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

from distq.data.folder import DECODE_ERRORS, MAX_PIXELS, SPLITS, DataError, TooManyPixels, check_pixels
from distq.data.shards import REPACK
from distq.progress import Progress

CMYK, GRAYSCALE = "CMYK JPEG", "grayscale JPEG"
FIX_QUALITY = 95
# The kinds of problem an image file can have (``inspect``), as the reports name them.
DOES_NOT_DECODE, UNREADABLE, TOO_LARGE = "does not decode", "permission denied", "too large"
CANNOT_OPEN = "cannot be opened for reading"


def oddity(image: Image.Image) -> str | None:
    """What is odd about an opened image file: None for an RGB JPEG."""
    if image.format != "JPEG":
        return f"{image.format or 'unknown'} saved as JPEG"
    if image.mode == "CMYK":
        return CMYK
    if image.mode in ("L", "1", "I;16"):
        return GRAYSCALE
    if image.mode != "RGB":
        return f"{image.mode} JPEG"
    return None


def needs_reencoding(data: bytes) -> str | None:
    """The oddity of an image file's bytes that a decoder may refuse (grayscale JPEGs decode
    everywhere), read from its header only; None when the bytes can be used as they are."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            odd = oddity(image)
    except DECODE_ERRORS:
        return None  # not decodable at all: the loaders name it when they meet it
    return None if odd in (None, GRAYSCALE) else odd


def rgb_jpeg_bytes(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> bytes:
    """An image file's bytes re-encoded as an RGB JPEG."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_pixels(image, max_pixels)
            rgb = image.convert("RGB")
    except TooManyPixels as exc:
        raise DataError(exc.explain(f"image file {name!r}", "--max-image-pixels")) from None
    except DECODE_ERRORS as exc:
        raise DataError(f"image file {name!r} is corrupt or truncated ({exc}): replace or delete it") from None
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=FIX_QUALITY)
    return out.getvalue()


Problem = tuple[str, str]
"""(kind, detail) of an image that cannot be used: ``DOES_NOT_DECODE``, ``UNREADABLE`` or ``TOO_LARGE``."""


def examine(file, max_pixels: int = MAX_PIXELS) -> tuple[str | None, Problem | None]:
    """(oddity, problem) of an open image file (or its bytes in a ``BytesIO``): every byte is
    read and decoded, unless the header says it is larger than ``max_pixels``."""
    try:
        with Image.open(file) as image:
            odd = oddity(image)
            check_pixels(image, max_pixels)
            image.draft(None, (1, 1))  # smallest DCT scale: reads and decodes every byte, quickly
            image.load()
        return odd, None
    except TooManyPixels as exc:
        return None, (TOO_LARGE, str(exc))
    except UnidentifiedImageError:  # its message names the file object, not the file
        return None, (DOES_NOT_DECODE, "not an image format PIL reads")
    except DECODE_ERRORS as exc:
        return None, (DOES_NOT_DECODE, str(exc) or type(exc).__name__)


def inspect(path: str, max_pixels: int = MAX_PIXELS) -> tuple[str | None, Problem | None]:
    """(oddity, problem) of one image file."""
    try:
        with open(path, "rb") as f:
            return examine(f, max_pixels)
    except PermissionError:
        return None, (UNREADABLE, CANNOT_OPEN)
    except OSError as exc:  # a directory named like an image, a file removed meanwhile
        return None, (DOES_NOT_DECODE, exc.strerror or str(exc))


def _inspect_many(paths: list[str], max_pixels: int = MAX_PIXELS) -> list[tuple[str | None, Problem | None]]:
    return [inspect(p, max_pixels) for p in paths]


_THEY = {DOES_NOT_DECODE: "do not decode", UNREADABLE: "cannot be read (permission denied)", TOO_LARGE: "are larger than the pixel limit"}


def problem_lines(problems: list[tuple[str, Problem]], max_listed: int, advice: dict[str, str], noun: str) -> list[str]:
    """``kind: where (detail)`` per problem, at most ``max_listed`` of each kind, then how many
    ``noun``s have it and ``advice[kind]``."""
    lines = []
    for kind in (DOES_NOT_DECODE, UNREADABLE, TOO_LARGE):
        of_kind = [(where, detail) for where, (k, detail) in problems if k == kind]
        lines += [f"{kind}: {where} ({detail})" for where, detail in of_kind[:max_listed]]
        if len(of_kind) > max_listed:
            lines.append(f"... and {len(of_kind) - max_listed} more")
        if of_kind:
            lines.append(f"{len(of_kind)} {noun}(s) {_THEY[kind]}: {advice[kind]}")
    return lines


FOLDER_ADVICE = {
    DOES_NOT_DECODE: "replace or delete these files",
    UNREADABLE: "make these files readable (chmod a+r): the images themselves may be fine",
    TOO_LARGE: "shrink them, or raise data.max_image_pixels (--max-image-pixels here) if they are meant to be this large",
}


@dataclass
class Report:
    root: Path
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    problems: list[tuple[str, Problem]] = field(default_factory=list)
    one_split: dict[str, str] = field(default_factory=dict)
    oddities: dict[str, list[str]] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)

    @property
    def undecodable(self) -> list[tuple[str, str]]:
        """(path, error) of the files that do not decode."""
        return [(path, detail) for path, (kind, detail) in self.problems if kind == DOES_NOT_DECODE]

    @property
    def clean(self) -> bool:
        """Nothing left to fix: every image reads and decodes within the pixel limit, every class
        is in both splits, no oddity unfixed."""
        unfixed = [p for paths in self.oddities.values() for p in paths if p not in self.fixed]
        return not (self.problems or self.one_split or unfixed)

    def lines(self, max_listed: int = 20) -> list[str]:
        lines = [f"verify {self.root}"]
        for split, per_class in self.counts.items():
            sizes = sorted(per_class.values())
            spread = f", {sizes[0]}..{sizes[-1]} per class" if sizes else ""
            lines.append(f"{split}: {sum(sizes)} images in {len(sizes)} classes{spread}")
            lines += [f"  {cls}: {n}" for cls, n in sorted(per_class.items())] if len(per_class) <= max_listed else []
        for cls, split in sorted(self.one_split.items()):
            lines.append(f"class {cls} is in {split}/ only")
        lines += problem_lines(self.problems, max_listed, FOLDER_ADVICE, "file")
        for kind, paths in sorted(self.oddities.items()):
            lines.append(f"{kind}: {len(paths)} file(s)" + (", re-encoded as RGB JPEG" if all(p in self.fixed for p in paths) else ""))
            lines += [f"  {p}" for p in paths[:max_listed]]
        if self.clean:
            lines.append("no problems found" if not self.fixed else f"fixed {len(self.fixed)} file(s); no problems left")
        elif any(p not in self.fixed for paths in self.oddities.values() for p in paths):
            lines.append(f"run 'distq data verify {self.root} --fix' to re-encode the odd files as RGB JPEGs")
        return lines


def image_files(root: Path) -> dict[str, dict[str, list[Path]]]:
    """``{split: {class: [image files]}}`` of the splits present."""
    tree: dict[str, dict[str, list[Path]]] = {}
    for split in SPLITS:
        folder = root / split
        if folder.is_dir():
            tree[split] = {
                cls.name: sorted(f for f in cls.iterdir() if f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS))
                for cls in sorted(folder.iterdir())
                if cls.is_dir()
            }
    return tree


def fix_file(path: Path) -> None:
    """Re-encode ``path`` as an RGB JPEG in place, atomically."""
    temporary = path.with_name(f".{path.name}.fix")
    temporary.write_bytes(rgb_jpeg_bytes(path.read_bytes(), str(path)))
    os.replace(temporary, path)


def verify(root: str | Path, fix: bool = False, workers: int | None = None, progress: bool = True, max_pixels: int = MAX_PIXELS) -> Report:
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"dataset folder {str(root)!r} is a file, expected a folder: verify a folder laid out as ROOT/train/<class>/*.JPEG")
    if not root.is_dir():
        raise DataError(f"dataset folder {str(root)!r} does not exist")
    tree = image_files(root)
    if not tree:
        raise DataError(f"{str(root)!r} has neither train/ nor val/: verify a folder laid out as ROOT/train/<class>/*.JPEG")
    report = Report(root, counts={split: {cls: len(files) for cls, files in classes.items()} for split, classes in tree.items()})
    if len(tree) == len(SPLITS):
        train, val = (set(tree[s]) for s in SPLITS)
        report.one_split = {cls: "train" for cls in train - val} | {cls: "val" for cls in val - train}
    paths = [str(f) for classes in tree.values() for files in classes.values() for f in files]
    workers = workers or os.cpu_count() or 1
    chunk = 64
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    inspect_many = functools.partial(_inspect_many, max_pixels=max_pixels)
    with Progress(len(paths), f"verify {root.name}", every=max(chunk, len(paths) // 20), unit="image", enabled=progress) as bar:
        if workers > 1 and len(chunks) > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = []
                for part in pool.map(inspect_many, chunks):
                    results += part
                    bar.update(len(part))
        else:
            results = []
            for part in chunks:
                results += inspect_many(part)
                bar.update(len(part))
    for path, (odd, problem) in zip(paths, results):
        if problem is not None:
            report.problems.append((path, problem))
        elif odd is not None:
            report.oddities.setdefault(odd, []).append(path)
    if fix:
        for odd_paths in report.oddities.values():
            for path in odd_paths:
                fix_file(Path(path))
                report.fixed.append(path)
    return report


@dataclass
class ShardsReport:
    """``distq data verify SHARDS``: the folder opens (sizes, index files, labels: ``ShardsFolder``),
    every shard's SHA-256 matches index.json, and the images per split and class."""

    root: Path
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    shards: int = 0
    mismatched: list[str] = field(default_factory=list)
    decoded: int | None = None
    """Samples decoded (``--decode``), None when not asked."""
    problems: list[tuple[str, Problem]] = field(default_factory=list)
    """(sample and shard, problem) of the samples that do not decode (``--decode``)."""

    @property
    def clean(self) -> bool:
        return not (self.mismatched or self.problems)

    def lines(self, max_listed: int = 20) -> list[str]:
        lines = [f"verify {self.root} (shards)"]
        for split, per_class in self.counts.items():
            sizes = sorted(per_class.values())
            lines.append(f"{split}: {sum(sizes)} images in {len(sizes)} classes, {sizes[0]}..{sizes[-1]} per class")
            lines += [f"  {cls}: {n}" for cls, n in sorted(per_class.items())] if len(per_class) <= max_listed else []
        lines += [f"checksum differs from index.json: {path}" for path in self.mismatched]
        lines.append(f"{self.shards} shards, checksums match index.json" if not self.mismatched else f"{len(self.mismatched)} of {self.shards} shards are damaged: restore them or re-run distq data pack")
        if self.decoded is not None:
            lines += problem_lines(self.problems, max_listed, SHARDS_ADVICE, "sample")
            checked = "" if not self.mismatched else " of the undamaged shards"
            lines.append(f"decoded {self.decoded} images{checked}: " + ("all decode" if not self.problems else f"{len(self.problems)} cannot be used"))
        return lines


SHARDS_ADVICE = {
    DOES_NOT_DECODE: f"replace or delete those images in the folder the shards were packed from, then {REPACK}",
    UNREADABLE: "make the shard files readable (chmod a+r)",
    TOO_LARGE: f"shrink those images in the folder the shards were packed from and {REPACK}, or raise data.max_image_pixels (--max-image-pixels here)",
}


def _examine_bytes(data: bytes, max_pixels: int) -> tuple[str | None, Problem | None]:
    return examine(io.BytesIO(data), max_pixels)


def _decode_split(split, first: int, count: int, pool: ThreadPoolExecutor, max_pixels: int, bar: Progress, chunk: int = 256) -> list[tuple[str, Problem]]:
    """Problems of samples ``first .. first + count - 1`` of ``split``: read here, decoded by ``pool``'s
    threads (PIL decodes without holding the GIL)."""
    problems = []
    for start in range(first, first + count, chunk):
        indices = range(start, min(start + chunk, first + count))
        images = [split.read(i)[0] for i in indices]
        for index, (_, problem) in zip(indices, pool.map(functools.partial(_examine_bytes, max_pixels=max_pixels), images)):
            if problem is not None:
                problems.append((split.describe(index), problem))
        bar.update(len(images))
    return problems


def verify_shards(root: str | Path, progress: bool = True, decode: bool = False, workers: int | None = None, max_pixels: int = MAX_PIXELS) -> ShardsReport:
    """Counts, checksums and, with ``decode``, every sample's image (of the shards whose checksum matches)."""
    import hashlib

    import numpy as np

    from distq.data.shards import ShardsFolder

    folder = ShardsFolder.open(root)
    report = ShardsReport(Path(root))
    splits = {name: folder.split(name) for name in folder.splits}
    intact: list[tuple[str, int]] = []  # (split, shard number) of the shards whose checksum matches
    total = sum(s.bytes for split in splits.values() for s in split.shards)
    with Progress(max(1, total >> 20), f"verify {report.root.name}", every=max(1, total >> 24), unit="MiB", enabled=progress) as bar:
        for name, split in splits.items():
            labels = np.zeros(len(split), dtype=np.int64)
            for shard_number, shard in enumerate(split.shards):
                digest = hashlib.sha256()
                with open(shard.tar, "rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        bar.update(len(chunk) >> 20)
                if digest.hexdigest() != shard.sha256:
                    report.mismatched.append(str(shard.tar))
                    continue
                first = int(split.starts[shard_number])
                labels[first : first + shard.samples] = [split.read_label(i) for i in range(first, first + shard.samples)]
                intact.append((name, shard_number))
            report.shards += len(split.shards)
            report.counts[name] = {folder.classes[c]: int(n) for c, n in enumerate(np.bincount(labels, minlength=len(folder.classes))) if n}
    if decode:
        report.decoded = sum(splits[name].shards[number].samples for name, number in intact)
        with Progress(report.decoded, f"decode {report.root.name}", every=max(1, report.decoded // 20), unit="image", enabled=progress) as bar, ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            for name, number in intact:
                split = splits[name]
                report.problems += _decode_split(split, int(split.starts[number]), split.shards[number].samples, pool, max_pixels, bar)
    return report
