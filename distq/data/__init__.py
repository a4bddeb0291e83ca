"""Data: the embedded digits dataset, ImageNet-layout folders and their loaders."""

from distq.data.digits import ensure_digits
from distq.data.folder import DataError, class_names, image_folder
from distq.data.loaders import DataBundle, build_loaders, build_val_loader, resolve_root

__all__ = ["DataBundle", "DataError", "build_loaders", "build_val_loader", "class_names", "ensure_digits", "image_folder", "resolve_root"]
