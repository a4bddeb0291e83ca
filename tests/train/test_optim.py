"""Optimizers and the engine's step against hand-computed updates: weight decay on conv/linear
weights only, SGD with Nesterov momentum, AdamW's decoupled decay and betas, per-group
learning rates, and gradient clipping to train.grad_clip."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from distq.config.schema import DistConfig, TrainConfig
from distq.data.order import BatchLayout
from distq.distributed import TeamModule, build_engine
from distq.distributed.env import DistEnv
from distq.train.optim import build_optimizer, param_groups


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    model[0].bias.requires_grad_(False)  # frozen parameters are in no group
    return model


def test_decay_goes_to_conv_and_linear_weights_only():
    model = tiny_model()
    decay, no_decay = param_groups(model, lr=0.3, weight_decay=0.01, name="student")
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[1].weight), id(model[1].bias), id(model[3].bias)}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    assert decay["base_lr"] == no_decay["base_lr"] == 0.3 and decay["model"] == "student"


def zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.zeros_like(p)


def test_sgd_decays_only_the_decay_group_with_nesterov_momentum():
    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cfg = TrainConfig(lr=0.5, momentum=0.9, nesterov=True, weight_decay=0.1)
    optimizer = build_optimizer(param_groups(model, 0.5, 0.1), cfg)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]
    zero_grads(model)
    optimizer.step()
    # First step, zero gradient: d = wd * w, buf = d, Nesterov update d + m * buf = (1 + m) wd w.
    for name, p in model.named_parameters():
        decays = name in ("0.weight", "3.weight")
        want = before[name] * (1 - 0.5 * 0.1 * 1.9) if decays else before[name]
        assert torch.allclose(p.detach(), want, rtol=0, atol=1e-7), name


def test_adamw_uses_momentum_as_beta1_and_decays_decoupled():
    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cfg = TrainConfig(optimizer="adamw", lr=0.01, momentum=0.8, weight_decay=0.5)
    optimizer = build_optimizer(param_groups(model, 0.01, 0.5), cfg)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.8, 0.999)
    grads = {}
    for name, p in model.named_parameters():
        grads[name] = torch.linspace(-2.0, 3.0, p.numel()).view_as(p)
        p.grad = grads[name].clone()
    optimizer.step()
    # First AdamW step: w (1 - lr wd) - lr * g / (|g| + eps) (bias-corrected moments are g and g^2).
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.5 if name in ("0.weight", "3.weight") else 0.0
        want = before[name] * (1 - 0.01 * decay) - 0.01 * grads[name] / (grads[name].abs() + 1e-8)
        assert torch.allclose(p.detach(), want, rtol=0, atol=1e-6), name


def engine_for(model: nn.Module, train: TrainConfig):
    optimizer = build_optimizer(param_groups(model, train.lr, train.weight_decay), train)
    team = TeamModule(nn.ModuleDict({"model": model}), nn.ModuleDict())
    return build_engine(team, optimizer, train, DistConfig(), BatchLayout(4), DistEnv())


@pytest.mark.parametrize("clip,norm", [(1.0, 5.0), (10.0, 5.0)])
def test_the_engine_clips_the_global_gradient_norm(clip, norm):
    model = tiny_model()
    train = TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.0, grad_clip=clip)
    engine = engine_for(model, train)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    # Gradients whose norm over all parameters is ``norm``: each entry norm / sqrt(count).
    count = sum(p.numel() for p in params)
    for p in params:
        p.grad = torch.full_like(p, norm / count**0.5)
    engine.step(boundary=True)
    scale = min(1.0, clip / norm)
    for p, b in zip(params, before):
        assert torch.allclose(p.detach(), b - 0.1 * scale * norm / count**0.5, rtol=0, atol=1e-6)


def test_set_lr_scales_every_group_from_its_own_base():
    model = tiny_model()
    groups = param_groups(model, 0.2, 1e-4, "guide") + param_groups(nn.Linear(2, 2), 0.05, 1e-4, "student")
    optimizer = build_optimizer(groups, TrainConfig())
    team = TeamModule(nn.ModuleDict({"model": model}), nn.ModuleDict())
    engine = build_engine(team, optimizer, TrainConfig(), DistConfig(), BatchLayout(4), DistEnv())
    engine.set_lr(0.5)
    assert [g["lr"] for g in engine.optimizer.param_groups] == pytest.approx([0.1, 0.1, 0.025, 0.025])
