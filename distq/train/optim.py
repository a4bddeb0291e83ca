"""Optimizers with one pair of parameter groups (decay / no decay) per model."""

from __future__ import annotations

import torch
import torch.nn as nn

from distq.config.schema import TrainConfig
from distq.quant.layers import quant_layers


def param_groups(model: nn.Module, lr: float, weight_decay: float, name: str = "model") -> list[dict]:
    """Weight decay on conv/linear weights only; biases and norm parameters are not decayed; a
    quantizer method's own parameters (LSQ's steps, PACT's clipping levels) take the decay their
    method gives them, each value its own group."""
    own: dict[int, float] = {}
    for _, layer in quant_layers(model):
        for attr, param in layer.named_parameters(recurse=False):
            decay = layer.quantizer.weight_decay(attr, weight_decay)
            if decay is not None:
                own[id(param)] = decay
    decay, no_decay, by_method = [], [], {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in own:
            by_method.setdefault(own[id(param)], []).append(param)
        else:
            (decay if param.dim() > 1 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "base_lr": lr, "model": name},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": lr, "model": name},
    ]
    groups += [{"params": params, "weight_decay": wd, "base_lr": lr, "model": name} for wd, params in by_method.items()]
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
