"""Top-1/top-5 accuracy and loss of a model over a validation loader (this rank's shard)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from distq.errors import DistqError
from distq.quant.layers import fixed_quantized_weights
from distq.train.metrics import topk_correct


def evaluate_counts(model: nn.Module, loader, device: torch.device) -> torch.Tensor:
    """``[top-1 hits, top-5 hits, summed loss, images]`` of ``model`` over ``loader``
    (counts, so the shards of several ranks add up exactly)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    with torch.inference_mode(), fixed_quantized_weights(model):  # the weights are quantized once, not per batch
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = model(images.to(next(model.parameters()).dtype)).float()
            hits = topk_correct(logits, labels).double()
            loss = F.cross_entropy(logits, labels, reduction="sum").double()
            totals += torch.stack([hits[0], hits[1], loss, torch.full((), labels.numel(), device=device, dtype=torch.float64)])
    model.train(was_training)
    return totals


def metrics_from_counts(totals: torch.Tensor) -> dict[str, float]:
    top1, top5, loss, seen = totals.tolist()
    if seen == 0:
        raise DistqError("the validation split is empty: put images in ROOT/val/<class>/")
    return {"top1": 100.0 * top1 / seen, "top5": 100.0 * top5 / seen, "loss": loss / seen}


def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu") -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean loss of ``model`` over ``loader``."""
    return metrics_from_counts(evaluate_counts(model, loader, torch.device(device)))
