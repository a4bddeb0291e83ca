"""Counting a model's top-k hits over a loader: the one loop every evaluation runs (training's
per-epoch validation, ``distq eval`` of a checkpoint, of the integer engine and of onnxruntime).

Counts, not means, so the shards of several ranks add up exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from distq.errors import DistqError
from distq.quant.layers import fixed_quantized_weights


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the top-k predictions, for each k."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top.eq(labels.unsqueeze(1))
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks])


def count_hits(predict: Callable[[torch.Tensor], torch.Tensor], loader, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[top-1 hits, top-5 hits, summed loss, images]`` (float64) of ``predict`` (images -> logits)
    over ``loader``."""
    device = torch.device(device)
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for images, labels, *_ in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = predict(images).float()
        hits = topk_correct(logits, labels).double()
        loss = F.cross_entropy(logits, labels, reduction="sum").double()
        totals += torch.stack([hits[0], hits[1], loss, torch.full((), labels.numel(), device=device, dtype=torch.float64)])
    return totals


def model_counts(model: nn.Module, loader, device: torch.device | str = "cpu") -> torch.Tensor:
    """``count_hits`` of a PyTorch model in eval mode, its quantized weights computed once."""
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    try:
        with torch.inference_mode(), fixed_quantized_weights(model):
            return count_hits(lambda images: model(images.to(dtype)), loader, device)
    finally:
        model.train(was_training)


def metrics_from_counts(totals: torch.Tensor, where: str = "the validation split") -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean loss."""
    top1, top5, loss, seen = totals.tolist()
    if seen == 0:
        raise DistqError(f"{where} is empty: put images in ROOT/val/<class>/")
    return {"top1": 100.0 * top1 / seen, "top5": 100.0 * top5 / seen, "loss": loss / seen}
