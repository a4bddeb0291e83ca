"""ImageNet-layout folders: ``ROOT/{train,val}/<class>/*.JPEG``, read with torchvision.

Every problem a user can fix is reported as a ``DataError`` naming the folder or file.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from distq.errors import DistqError

SPLITS = ("train", "val")
CLASS_NAMES = "class_names.json"
"""``ROOT/class_names.json``: ``{class folder: readable name}`` (``distq data prepare`` writes
ImageNet's, e.g. ``"n01440764": "tench, Tinca tinca"``); optional."""


class DataError(DistqError):
    """A dataset folder or image file the user must fix."""


def open_rgb(file) -> Image.Image:
    """Decode an image (a path or a binary file object) fully, so truncation shows here, as RGB."""
    image = Image.open(file)
    image.load()
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """``open_rgb`` of an image file, with a ``DataError`` naming the file if it does not decode."""
    try:
        with open(path, "rb") as f:
            return open_rgb(f)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"image file {path!r} is corrupt or truncated ({exc}): replace or delete it") from None


def check_split_folder(root: Path, split: str) -> Path:
    """Validate ``root/split`` and return it; names what is missing and what to do."""
    if not root.is_dir():
        raise DataError(f"dataset folder {str(root)!r} does not exist: set data.root to an ImageNet-layout folder")
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"dataset folder {str(folder)!r} is missing: {root} needs train/ and val/ subfolders of class folders")
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"dataset folder {str(folder)!r} has no class folders: put each class's images in {folder}/<class>/")
    for cls in classes:
        if not any(f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS) for f in cls.iterdir()):
            raise DataError(f"class folder {str(cls)!r} has no images ({', '.join(IMG_EXTENSIONS[:3])}, ...): add images or remove the folder")
    return folder


def image_folder(root: str | Path, split: str, transform=None) -> ImageFolder:
    """torchvision's ImageFolder over ``root/split`` with validation and a loader that names bad files."""
    folder = check_split_folder(Path(root), split)
    return ImageFolder(str(folder), transform=transform, loader=load_rgb)


def class_names(root: str | Path) -> list[str]:
    """Sorted class-folder names of the train split: the class-index mapping of every loader."""
    folder = check_split_folder(Path(root), "train")
    return sorted(p.name for p in folder.iterdir() if p.is_dir())
