"""``distq data verify ROOT [--fix]``: one report on an ImageNet-layout folder.

Counts images per split and class, decodes every image (names the files that do not decode),
lists classes present in one split only, and the oddities ImageNet's training set is known to
hold and some decoders refuse: CMYK JPEGs, grayscale JPEGs, and PNG (or other) files saved as
.JPEG. ``--fix`` re-encodes the odd files as RGB JPEGs in place (each written to a temporary
file and renamed over the original, so an interruption never leaves half a file).

Decoding uses PIL's reduced-size JPEG decoding (``draft``): every byte of the file is still
read and entropy-decoded, so a truncated or corrupt file fails as it would at full size.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

from distq.data.folder import SPLITS, DataError
from distq.progress import Progress

CMYK, GRAYSCALE = "CMYK JPEG", "grayscale JPEG"
FIX_QUALITY = 95
DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


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


def rgb_jpeg_bytes(data: bytes, name: str) -> bytes:
    """An image file's bytes re-encoded as an RGB JPEG."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
    except DECODE_ERRORS as exc:
        raise DataError(f"image file {name!r} is corrupt or truncated ({exc}): replace or delete it") from None
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=FIX_QUALITY)
    return out.getvalue()


def inspect(path: str) -> tuple[str | None, str | None]:
    """(oddity, decoding error) of one image file."""
    try:
        with Image.open(path) as image:
            odd = oddity(image)
            image.draft(None, (1, 1))  # smallest DCT scale: reads and decodes every byte, quickly
            image.load()
        return odd, None
    except DECODE_ERRORS as exc:
        return None, str(exc) or type(exc).__name__


def _inspect_many(paths: list[str]) -> list[tuple[str | None, str | None]]:
    return [inspect(p) for p in paths]


@dataclass
class Report:
    root: Path
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    undecodable: list[tuple[str, str]] = field(default_factory=list)
    one_split: dict[str, str] = field(default_factory=dict)
    oddities: dict[str, list[str]] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Nothing left to fix: every image decodes, every class is in both splits, no oddity unfixed."""
        unfixed = [p for paths in self.oddities.values() for p in paths if p not in self.fixed]
        return not (self.undecodable or self.one_split or unfixed)

    def lines(self, max_listed: int = 20) -> list[str]:
        lines = [f"verify {self.root}"]
        for split, per_class in self.counts.items():
            sizes = sorted(per_class.values())
            spread = f", {sizes[0]}..{sizes[-1]} per class" if sizes else ""
            lines.append(f"{split}: {sum(sizes)} images in {len(sizes)} classes{spread}")
            lines += [f"  {cls}: {n}" for cls, n in sorted(per_class.items())] if len(per_class) <= max_listed else []
        for cls, split in sorted(self.one_split.items()):
            lines.append(f"class {cls} is in {split}/ only")
        for path, error in self.undecodable[:max_listed]:
            lines.append(f"does not decode: {path} ({error})")
        if len(self.undecodable) > max_listed:
            lines.append(f"... and {len(self.undecodable) - max_listed} more files that do not decode")
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


def verify(root: str | Path, fix: bool = False, workers: int | None = None, progress: bool = True) -> Report:
    root = Path(root)
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
    with Progress(len(paths), f"verify {root.name}", every=max(chunk, len(paths) // 20), unit="image", enabled=progress) as bar:
        if workers > 1 and len(chunks) > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = []
                for part in pool.map(_inspect_many, chunks):
                    results += part
                    bar.update(len(part))
        else:
            results = []
            for part in chunks:
                results += _inspect_many(part)
                bar.update(len(part))
    for path, (odd, error) in zip(paths, results):
        if error is not None:
            report.undecodable.append((path, error))
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

    @property
    def clean(self) -> bool:
        return not self.mismatched

    def lines(self, max_listed: int = 20) -> list[str]:
        lines = [f"verify {self.root} (shards)"]
        for split, per_class in self.counts.items():
            sizes = sorted(per_class.values())
            lines.append(f"{split}: {sum(sizes)} images in {len(sizes)} classes, {sizes[0]}..{sizes[-1]} per class")
            lines += [f"  {cls}: {n}" for cls, n in sorted(per_class.items())] if len(per_class) <= max_listed else []
        lines += [f"checksum differs from index.json: {path}" for path in self.mismatched]
        lines.append(f"{self.shards} shards, checksums match index.json" if self.clean else f"{len(self.mismatched)} of {self.shards} shards are damaged: restore them or re-run distq data pack")
        return lines


def verify_shards(root: str | Path, progress: bool = True) -> ShardsReport:
    import hashlib

    import numpy as np

    from distq.data.shards import ShardsFolder

    folder = ShardsFolder.open(root)
    report = ShardsReport(Path(root))
    splits = {name: folder.split(name) for name in folder.splits}
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
            report.shards += len(split.shards)
            report.counts[name] = {folder.classes[c]: int(n) for c, n in enumerate(np.bincount(labels, minlength=len(folder.classes))) if n}
    return report
