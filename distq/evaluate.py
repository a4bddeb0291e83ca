"""``distq eval``: one evaluation for a training checkpoint, the integer engine and onnxruntime
alike: the validation split is found and checked one way (class folders or shards, whichever the
root holds), read through the one validation transform (``distq.data.transforms.val_transform``)
and counted by the one top-k loop (``distq.models.evaluation``)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable

import torch

from distq.config.schema import DataConfig
from distq.data import build_val_loader, resolve_root
from distq.data.bundle import dataset_classes
from distq.errors import DistqError
from distq.models.evaluation import metrics_from_counts, model_counts
from distq.models.team import SINGLE
from distq.models.trained import load_trained

EVAL_BATCH_SIZE = 64
EVAL_WORKERS = 2


def val_split(data: DataConfig, root: str | None = None) -> DataConfig:
    """``data`` (a run's data config, or one an export's header describes), with ``root`` in place of
    its own when given: class folders or shards, whichever ``root`` holds."""
    if root is None:
        return data
    from pathlib import Path

    from distq.data.shards import is_shards_folder

    if is_shards_folder(root):
        return dataclasses.replace(data, root=root, format="shards")
    if not (Path(root) / "val").is_dir():
        what = "does not exist" if not Path(root).exists() else "has no val/ folder and is not a shards folder (index.json)"
        raise DistqError(f"--data {root!r} {what}: give the root of the validation data (ROOT/val/<class>/ images, or a distq data pack output)")
    return dataclasses.replace(data, root=root, format="folders")


def evaluate(counts_of: Callable[[Iterable], torch.Tensor], classes: list[str], data: DataConfig, what: str) -> dict[str, float]:
    """Top-1/top-5 (percent), loss and image count on ``data``'s validation split, after checking that
    the split's classes are ``classes`` in their order (``what`` names the model in messages).
    ``counts_of(loader)`` counts the hits (``distq.models.evaluation``): ``model_counts`` of a PyTorch
    model, ``count_hits`` of any images -> logits callable (the integer engine, onnxruntime)."""
    root = resolve_root(data)
    check_same_classes(val_classes(data, root), classes, f"dataset {str(root)!r}", what)
    totals = counts_of(build_val_loader(data, root))
    return {**metrics_from_counts(totals, f"the validation split of {str(root)!r}"), "images": int(totals[3])}


def val_classes(data: DataConfig, root) -> list[str]:
    """The classes of the validation split, in label order: a shards folder's, or the sorted class
    folders of ROOT/val (the labels the validation loader gives; no train/ needed to evaluate)."""
    if data.format == "shards":
        return dataset_classes(data, root)
    from distq.data.folder import check_split_folder

    return sorted(p.name for p in check_split_folder(root, "val").iterdir() if p.is_dir())


def evaluate_checkpoint(path: str, data_root: str | None = None) -> dict:
    trained = load_trained(path)
    data = dataclasses.replace(val_split(trained.cfg.data, data_root), batch_size=EVAL_BATCH_SIZE, workers=EVAL_WORKERS)
    results = {}
    for name in trained.names:
        metrics = evaluate(functools.partial(model_counts, trained.model(name)), trained.classes, data, f"checkpoint {path!r}")
        prefix = "val" if name == SINGLE else f"val/{name}"
        results.update({f"{prefix}/top1": metrics["top1"], f"{prefix}/top5": metrics["top5"]})
    return results


def export_data(header: dict, data_root: str | None = None) -> DataConfig:
    """The validation data of an export file: ``data_root``, or the data the model was trained on
    (its header's ``source``: folders or shards), read as its ``preprocess`` says."""
    source = header.get("source", {})
    preprocess = header["preprocess"]
    trained_on = DataConfig(
        root=source.get("data_root"),
        format=source.get("data_format", "folders"),
        image_size=int(preprocess["image_size"]),
        val_crop_ratio=float(preprocess["val_crop_ratio"]),
        batch_size=EVAL_BATCH_SIZE,
        workers=EVAL_WORKERS,
    )
    return val_split(trained_on, data_root)


def check_same_classes(data: list[str], trained: list[str], dataset: str, model: str, shown: int = 3) -> None:
    """DistqError unless the data's classes are the model's, in its order; the message names the
    difference: a few of the classes missing from the data and of those extra in it, and how many."""
    if data == trained:
        return
    data_set, trained_set = set(data), set(trained)
    missing = [c for c in trained if c not in data_set]
    extra = [c for c in data if c not in trained_set]

    def few(names: list[str]) -> str:
        return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")

    differences = []
    if missing:
        differences.append(f"{len(missing)} of them missing from the data ({few(missing)})")
    if extra:
        differences.append(f"{len(extra)} extra in the data ({few(extra)})")
    if not differences:
        at = next(i for i, (a, b) in enumerate(zip(data, trained)) if a != b) if len(data) == len(trained) else None
        differences.append(
            f"the same names in another order (position {at}: {data[at]!r} in the data, {trained[at]!r} in the model)"
            if at is not None
            else "some names repeated"
        )
    raise DistqError(
        f"{dataset} has {len(data)} classes but {model} was trained on {len(trained)}: {'; '.join(differences)}: "
        "evaluate on a dataset with the same class folders"
    )
