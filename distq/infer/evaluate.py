"""Run an export on data: the validation split (``distq eval --engine int|onnx``) and single
images (``distq predict``), on the integer engine or, for an ONNX file, onnxruntime.
Preprocessing comes from the export file's header (an ONNX file's metadata)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from distq.errors import DistqError
from distq.infer.engine import IntegerModel, load_engine

if TYPE_CHECKING:
    from distq.infer.onnx_runtime import OnnxModel


def header_transform(preprocess: dict):
    """The validation transform the model was trained with (``distq.data.transforms``), as the header says."""
    from distq.data.transforms import val_transform

    return val_transform(int(preprocess["image_size"]), float(preprocess["val_crop_ratio"]))


def load_runner(path: str, engine: str = "int"):
    """The model of an export file: the integer engine, or onnxruntime (``engine="onnx"``)."""
    if engine == "onnx":
        from distq.infer.onnx_runtime import OnnxModel

        return OnnxModel(path)
    return load_engine(path)


def evaluate_export(path: str, data_root: str | None = None, engine_name: str = "int") -> dict:
    """Top-1/top-5 (percent) of the integer engine (or onnxruntime) on ``data_root``'s val split
    (default: the dataset the model was trained on, folders or shards), and which kernels ran:
    ``distq.evaluate.evaluate``, as for a checkpoint."""
    from distq.evaluate import evaluate, export_data
    from distq.models.evaluation import count_hits

    engine = load_runner(path, engine_name)
    metrics = evaluate(functools.partial(count_hits, engine), engine.classes, export_data(engine.header, data_root), f"export file {path!r}")
    return {
        "engine": engine_name,
        "kernels": getattr(engine, "kernels", "onnxruntime"),
        "val/top1": metrics["top1"],
        "val/top5": metrics["top5"],
        "images": metrics["images"],
    }


def predict(engine: IntegerModel | OnnxModel, image_paths: list[str], k: int = 5, max_pixels: int | None = None) -> list[list[tuple[str, float]]]:
    """Top-``k`` (class name, probability) for each image; an image larger than ``max_pixels``
    (default: data.max_image_pixels's) is an error naming ``--max-image-pixels``."""
    from distq.data.folder import MAX_PIXELS, load_rgb

    transform = header_transform(engine.header["preprocess"])
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
