"""The embedded default dataset: scikit-learn's bundled handwritten digits as JPEG files.

Written once, deterministically, in the ImageNet layout (``train/<class>/*.JPEG``,
``val/<class>/*.JPEG``, RGB, 32x32), so the default job reads files through exactly the
code path an ImageNet run uses. Every fifth image of each class goes to ``val``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from distq.cache import default_cache_dir

VERSION = "digits-v1"
IMAGE_SIZE = 32
VAL_EVERY = 5


def _write(root: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    seen: dict[int, int] = {}
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        label = int(label)
        nth = seen.get(label, 0)
        seen[label] = nth + 1
        split = "val" if nth % VAL_EVERY == VAL_EVERY - 1 else "train"
        folder = root / split / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        gray = Image.fromarray(np.uint8(np.round(pixels * (255.0 / 16.0))), mode="L")
        rgb = gray.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).convert("RGB")
        rgb.save(folder / f"{index:05d}.JPEG", quality=95)


def ensure_digits(cache_dir: Path | None = None) -> Path:
    """Return the digits folder, writing it on first use.

    The folder is built under a temporary name and renamed into place, so an
    interrupted first run never leaves a half-written dataset behind, and concurrent
    first runs (several ranks) agree on one complete copy.
    """
    cache_dir = Path(cache_dir or default_cache_dir())
    root = cache_dir / VERSION
    if (root / "COMPLETE").is_file():
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{VERSION}-", dir=cache_dir))
    try:
        _write(staging)
        (staging / "COMPLETE").write_text(VERSION + "\n")
        try:
            os.rename(staging, root)
        except OSError:
            if not (root / "COMPLETE").is_file():  # lost a race to a broken copy: replace it
                shutil.rmtree(root, ignore_errors=True)
                os.rename(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
