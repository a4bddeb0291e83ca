"""ImageNet-layout folders: ``ROOT/{train,val}/<class>/*.JPEG``, read with torchvision.

Every problem a user can fix is reported as a ``DataError`` naming the folder or file.
"""

from __future__ import annotations

import functools
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from distq.config.schema import DataConfig
from distq.errors import DistqError

SPLITS = ("train", "val")
CLASS_NAMES = "class_names.json"
"""``ROOT/class_names.json``: ``{class folder: readable name}`` (``distq data prepare`` writes
ImageNet's, e.g. ``"n01440764": "tench, Tinca tinca"``); optional."""
MAX_PIXELS = DataConfig.max_image_pixels
MAX_PIXELS_KEY = "data.max_image_pixels"
DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError)
PERMISSION_DENIED = "permission denied: make it readable by the user running distq (chmod a+r)"

# The size limit is distq's (``open_rgb``'s check against data.max_image_pixels, which names the
# file and the key); Pillow's own, a module global, would stop a raised data.max_image_pixels at its
# default and fails with a traceback naming neither.
Image.MAX_IMAGE_PIXELS = None


class DataError(DistqError):
    """A dataset folder or image file the user must fix."""


class TooManyPixels(Exception):
    """An image whose width x height is over the limit, found from its header before decoding."""

    def __init__(self, size: tuple[int, int], limit: int):
        self.size, self.limit = size, limit
        super().__init__(f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels, more than the limit {limit}")

    def explain(self, what: str, setting: str = MAX_PIXELS_KEY, fix: str = "shrink it") -> str:
        """One line: ``what`` is ``size`` pixels, over ``setting``, and what to do."""
        width, height = self.size
        return f"{what} has {width * height} pixels ({width}x{height}), more than {setting}={self.limit}: {fix}, or raise {setting} if it is meant to be this large"


def check_pixels(image: Image.Image, limit: int) -> None:
    """Raise ``TooManyPixels`` when an opened (not yet decoded) image is larger than ``limit``."""
    if image.width * image.height > limit:
        raise TooManyPixels(image.size, limit)


def open_rgb(file, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image (a path or a binary file object) fully, so truncation shows here, as RGB;
    ``TooManyPixels`` before decoding one larger than ``max_pixels``."""
    image = Image.open(file)
    check_pixels(image, max_pixels)
    image.load()
    return image.convert("RGB")


def load_rgb(path: str, max_pixels: int = MAX_PIXELS, setting: str = MAX_PIXELS_KEY) -> Image.Image:
    """``open_rgb`` of an image file, with a ``DataError`` naming the file if it cannot be read, does
    not decode or is larger than ``max_pixels`` (``setting``: the name of that limit for the user)."""
    try:
        with open(path, "rb") as f:
            return open_rgb(f, max_pixels)
    except TooManyPixels as exc:
        raise DataError(exc.explain(f"image file {path!r}", setting)) from None
    except PermissionError:
        raise DataError(f"image file {path!r} cannot be read: {PERMISSION_DENIED}") from None
    except IsADirectoryError:
        raise DataError(f"image file {path!r} is a directory, expected an image file: give the path of an image") from None
    except FileNotFoundError:
        raise DataError(f"image file {path!r} not found (removed while distq ran?): restore it") from None
    except DECODE_ERRORS as exc:
        raise DataError(f"image file {path!r} is corrupt or truncated ({exc}): replace or delete it") from None


def require_folder(path: Path, what: str, fix: str) -> None:
    """Raise a ``DataError`` unless ``path`` is a folder: it is missing, or a file (``what``: how
    the user knows the path, ``fix``: what to do)."""
    if path.is_dir():
        return
    if path.exists():
        raise DataError(f"{what} {str(path)!r} is a file, expected a folder: {fix}")
    raise DataError(f"{what} {str(path)!r} does not exist: {fix}")


ROOT_FIX = "set data.root to an ImageNet-layout folder (ROOT/train/<class>/*.JPEG)"


def check_split_folder(root: Path, split: str) -> Path:
    """Validate ``root/split`` and return it; names what is missing and what to do."""
    require_folder(root, "dataset folder", ROOT_FIX)
    folder = root / split
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{str(folder)!r} is a file, expected a folder: {root} needs train/ and val/ subfolders of class folders")
    if not folder.is_dir():
        raise DataError(f"dataset folder {str(folder)!r} is missing: {root} needs train/ and val/ subfolders of class folders")
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"dataset folder {str(folder)!r} has no class folders: put each class's images in {folder}/<class>/")
    for cls in classes:
        if not any(f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS) for f in cls.iterdir()):
            raise DataError(f"class folder {str(cls)!r} has no images ({', '.join(IMG_EXTENSIONS[:3])}, ...): add images or remove the folder")
    return folder


def image_folder(root: str | Path, split: str, transform=None, max_pixels: int = MAX_PIXELS) -> ImageFolder:
    """torchvision's ImageFolder over ``root/split`` with validation and a loader that names bad
    files (and images larger than ``max_pixels``)."""
    folder = check_split_folder(Path(root), split)
    return ImageFolder(str(folder), transform=transform, loader=functools.partial(load_rgb, max_pixels=max_pixels))


def check_class_count(classes: list[str], where: str, fix: str) -> None:
    """A classifier needs two classes: with one, every label is 0 and training reaches 100% top-1 at loss 0."""
    if len(classes) < 2:
        raise DataError(
            f"{where} has {len(classes)} class ({', '.join(classes)}): a classifier needs at least two "
            f"(with one, every prediction is right and the loss is 0): {fix}"
        )


def class_names(root: str | Path) -> list[str]:
    """Sorted class-folder names of the train split: the class-index mapping of every loader."""
    folder = check_split_folder(Path(root), "train")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    check_class_count(classes, f"dataset folder {str(folder)!r}", f"add a folder of images per class to {folder}")
    return classes
