"""Evaluate a training checkpoint on a validation split."""

from __future__ import annotations

from distq.data import build_val_loader, resolve_root
from distq.data.bundle import dataset_classes
from distq.errors import DistqError
from distq.models.team import SINGLE
from distq.models.trained import load_trained
from distq.train.evaluation import evaluate


def evaluate_checkpoint(path: str, data_root: str | None = None) -> dict:
    trained = load_trained(path)
    cfg = trained.cfg
    if data_root is not None:  # folders or shards, whichever it is
        from distq.data.shards import is_shards_folder

        cfg.data.root = data_root
        cfg.data.format = "shards" if is_shards_folder(data_root) else "folders"
    root = resolve_root(cfg.data)
    classes = dataset_classes(cfg.data, root)
    if classes != trained.classes:
        raise DistqError(
            f"dataset {str(root)!r} has classes {classes[:3]}... but checkpoint {path!r} was trained on "
            f"{trained.classes[:3]}...: evaluate on a dataset with the same class folders"
        )
    loader = build_val_loader(cfg.data, root)
    results = {}
    for name in trained.names:
        metrics = evaluate(trained.model(name), loader)
        prefix = "val" if name == SINGLE else f"val/{name}"
        results.update({f"{prefix}/top1": metrics["top1"], f"{prefix}/top5": metrics["top5"]})
    return results
