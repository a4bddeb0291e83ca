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
    check_same_classes(dataset_classes(cfg.data, root), trained.classes, f"dataset {str(root)!r}", f"checkpoint {path!r}")
    loader = build_val_loader(cfg.data, root)
    results = {}
    for name in trained.names:
        metrics = evaluate(trained.model(name), loader)
        prefix = "val" if name == SINGLE else f"val/{name}"
        results.update({f"{prefix}/top1": metrics["top1"], f"{prefix}/top5": metrics["top5"]})
    return results


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
