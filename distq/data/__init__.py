"""Data: the embedded digits dataset, ImageNet-layout folders and their loaders."""

from distq.data.bundle import DataBundle, resolve_root
from distq.data.digits import ensure_digits
from distq.data.folder import DataError, class_names, image_folder
from distq.data.loaders import build_loaders
from distq.data.order import BatchLayout
from distq.data.torchvision_loader import build_val_loader

__all__ = [
    "BatchLayout",
    "DataBundle",
    "DataError",
    "build_loaders",
    "build_val_loader",
    "class_names",
    "ensure_digits",
    "image_folder",
    "resolve_root",
]
