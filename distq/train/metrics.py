"""Top-k accuracy counting (counts, not means, so shards can be summed exactly)."""

from __future__ import annotations

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the top-k predictions, for each k."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top.eq(labels.unsqueeze(1))
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks])
