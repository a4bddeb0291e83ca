"""Evaluate a training checkpoint on a validation split."""

from __future__ import annotations

from distq.checkpoint import load_state as load_checkpoint
from distq.checkpoint import load_weights
from distq.config import config_from_dict
from distq.data import build_val_loader, resolve_root
from distq.data.bundle import dataset_classes
from distq.errors import DistqError
from distq.models.build import build_model
from distq.train.evaluation import evaluate
from distq.train.team import SINGLE


def evaluate_checkpoint(path: str, data_root: str | None = None) -> dict:
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"])
    if data_root is not None:  # folders or shards, whichever it is
        from distq.data.shards import is_shards_folder

        cfg.data.root = data_root
        cfg.data.format = "shards" if is_shards_folder(data_root) else "folders"
    root = resolve_root(cfg.data)
    classes = dataset_classes(cfg.data, root)
    if classes != state["classes"]:
        raise DistqError(
            f"dataset {str(root)!r} has classes {classes[:3]}... but checkpoint {path!r} was trained on "
            f"{state['classes'][:3]}...: evaluate on a dataset with the same class folders"
        )
    loader = build_val_loader(cfg.data, root)
    results = {}
    for name, weights in state["models"].items():
        model = build_model(cfg.model, cfg.quant, len(classes))
        load_weights(model, weights, f"checkpoint {path!r}")
        metrics = evaluate(model, loader)
        prefix = "val" if name == SINGLE else f"val/{name}"
        results.update({f"{prefix}/top1": metrics["top1"], f"{prefix}/top5": metrics["top5"]})
    return results
