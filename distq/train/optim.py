"""Optimizers with one pair of parameter groups (decay / no decay) per model."""

from __future__ import annotations

import torch
import torch.nn as nn

from distq.config.schema import TrainConfig


def param_groups(model: nn.Module, lr: float, weight_decay: float, name: str = "model") -> list[dict]:
    """Weight decay on conv/linear weights only; biases and norm parameters are not decayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() > 1 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "base_lr": lr, "model": name},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": lr, "model": name},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    for group in groups:
        group["lr"] = group["base_lr"]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
