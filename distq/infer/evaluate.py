"""Run an export on data: the validation split (``distq eval --engine int|onnx``) and single
images (``distq predict``), on the integer engine or, for an ONNX file, onnxruntime.
Preprocessing comes from the export file's header (an ONNX file's metadata)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader

from distq.errors import DistqError
from distq.infer.engine import IntegerModel, load_engine

if TYPE_CHECKING:
    from distq.infer.onnx_runtime import OnnxModel

EVAL_BATCH_SIZE = 64
EVAL_WORKERS = 2


def val_transform(preprocess: dict) -> T.Compose:
    """The validation transform the model was trained with, from the header alone."""
    from distq.data.transforms import val_resize_size

    size = int(preprocess["image_size"])
    return T.Compose(
        [
            T.Resize(val_resize_size(size, float(preprocess["val_crop_ratio"]))),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(preprocess["mean"], preprocess["std"]),
        ]
    )


def load_runner(path: str, engine: str = "int"):
    """The model of an export file: the integer engine, or onnxruntime (``engine="onnx"``)."""
    if engine == "onnx":
        from distq.infer.onnx_runtime import OnnxModel

        return OnnxModel(path)
    return load_engine(path)


def evaluate_export(path: str, data_root: str | None = None, engine_name: str = "int") -> dict:
    """Top-1/top-5 (percent) of the integer engine (or onnxruntime) on ``data_root``'s val
    split (default: the dataset the model was trained on), and which kernels ran."""
    from distq.data import class_names, ensure_digits, image_folder
    from distq.evaluate import check_same_classes
    from distq.train.metrics import topk_correct

    engine = load_runner(path, engine_name)
    root = Path(data_root or engine.header.get("source", {}).get("data_root") or ensure_digits())
    check_same_classes(class_names(root), engine.classes, f"dataset {str(root)!r}", f"export file {path!r}")
    loader = DataLoader(
        image_folder(root, "val", val_transform(engine.header["preprocess"])),
        batch_size=EVAL_BATCH_SIZE,
        num_workers=EVAL_WORKERS,
    )
    counts, seen = torch.zeros(2, dtype=torch.long), 0
    for images, labels in loader:
        counts += topk_correct(engine(images), labels)
        seen += labels.numel()
    if seen == 0:
        raise DistqError(f"the validation split of {str(root)!r} is empty: put images in ROOT/val/<class>/")
    return {
        "engine": engine_name,
        "kernels": getattr(engine, "kernels", "onnxruntime"),
        "val/top1": 100.0 * counts[0].item() / seen,
        "val/top5": 100.0 * counts[1].item() / seen,
        "images": seen,
    }


def predict(engine: IntegerModel | OnnxModel, image_paths: list[str], k: int = 5, max_pixels: int | None = None) -> list[list[tuple[str, float]]]:
    """Top-``k`` (class name, probability) for each image; an image larger than ``max_pixels``
    (default: data.max_image_pixels's) is an error naming ``--max-image-pixels``."""
    from distq.data.folder import MAX_PIXELS, load_rgb

    transform = val_transform(engine.header["preprocess"])
    folders = [p for p in image_paths if Path(p).is_dir()]
    if folders:
        raise DistqError(f"image file {folders[0]!r} is a directory, expected an image file: give the images in it (e.g. {folders[0]}/*.jpg)")
    missing = [p for p in image_paths if not Path(p).is_file()]
    if missing:
        raise DistqError(f"image file {missing[0]!r} not found")
    batch = torch.stack([transform(load_rgb(p, max_pixels or MAX_PIXELS, "--max-image-pixels")) for p in image_paths])
    probs = torch.softmax(engine(batch), dim=1)
    top = probs.topk(min(k, probs.shape[1]), dim=1)
    return [
        [(engine.classes[i], float(p)) for p, i in zip(ps.tolist(), idx.tolist())] for ps, idx in zip(top.values, top.indices)
    ]
