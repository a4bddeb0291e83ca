"""The parts of a training step, assembled in one place: the trainer composes them, and every
benchmark that times "a training step" builds the very same step here.

``build_step`` makes the team (guide and students, with their quantizer methods), the objective,
the precision controller, the optimizer's parameter groups (the auxiliary branches' included),
``train.compile`` and the engine. ``TrainStep`` runs one step of it: the controller's
``BATCH_START`` event (``start``), forward, objective, backward and the optimizer step on the
accumulation boundary (``__call__``), the ``AFTER_STEP`` event (``finish``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from distq.config import DistqConfig
from distq.controller import Clock, Event, PrecisionController
from distq.data.order import BatchLayout
from distq.distributed import TeamModule, build_engine
from distq.distributed.engine import Engine, use_device
from distq.distributed.env import DistEnv
from distq.models.team import Member, build_team, main_model_name
from distq.quant.calibrate import calibrate
from distq.train.compiling import compile_models
from distq.train.optim import build_optimizer, param_groups
from distq.train.team import FeatureTap, build_objective

AUX_GROUP = "aux:"
"""Prefix of the auxiliary branches' optimizer groups."""


@dataclass
class TrainStep:
    team: list[Member]
    models: nn.ModuleDict
    main: str
    """The model whose accuracy is the run's headline."""
    objective: Callable
    tap: FeatureTap | None
    controller: PrecisionController
    engine: Engine
    on_loss: Callable[[torch.Tensor], None] | None = None
    """Sees every micro-batch's total loss before the backward (the non-finite guard)."""
    grad_norm: float | None = None
    """Of the last optimizer step."""

    def start(self, step: int) -> None:
        """Before the first micro-batch of optimizer step ``step``: the precision of that step."""
        self.controller.on_event(Event.BATCH_START, step)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, boundary: bool = True) -> dict[str, torch.Tensor]:
        """Forward and backward of every model on the same micro-batch; the optimizer steps on the
        accumulation boundary. Returns each model's loss."""
        device = self.engine.device
        images = images.to(device, non_blocking=True, memory_format=self.engine.memory_format)
        labels = labels.to(device, non_blocking=True)
        with self.engine.autocast():
            logits = self.engine.forward(images)
            losses = self.objective(logits, labels, self.tap.features if self.tap else None)
        total = torch.stack(list(losses.values())).sum()
        if self.on_loss is not None:
            self.on_loss(total)
        self.engine.backward(total)
        self.grad_norm = self.engine.step(boundary)
        return {name: loss.detach() for name, loss in losses.items()}

    def finish(self, step: int) -> None:
        """After optimizer step ``step``: the policies' and methods' edits (AQE's clip), then the
        engine refreshes any copy of the weights it keeps."""
        self.controller.on_event(Event.AFTER_STEP, step)
        if self.controller.edits_weights:
            self.engine.weights_changed()

    def calibrate(self, images: torch.Tensor) -> int:
        """The quantizer methods' learnable parameters from ``images`` (a fresh run's first batch),
        summed over the ranks; returns how many layers were set."""
        images = images.to(self.engine.device, memory_format=self.engine.memory_format)
        count = calibrate(self.models.values(), images, self.engine.all_reduce_sum)
        self.engine.weights_changed()
        return count


def build_step(cfg: DistqConfig, num_classes: int, clock: Clock, layout: BatchLayout, env: DistEnv) -> TrainStep:
    """Every part of ``cfg``'s training step, on this process (``env``), for batches of ``layout``."""
    team = build_team(cfg, num_classes)
    models = nn.ModuleDict({m.name: m.model for m in team})
    objective = build_objective(cfg, team)
    tap = FeatureTap(team, cfg.guided.hint.layer) if cfg.guided and cfg.guided.hint else None
    controller = PrecisionController(cfg, clock, team)
    groups = [g for m in team for g in param_groups(m.model, m.lr, cfg.train.weight_decay, m.name)]
    for name, params in controller.aux_parameters().items():
        groups.append({"params": params, "weight_decay": cfg.train.weight_decay, "base_lr": cfg.train.lr, "model": AUX_GROUP + name})
    if cfg.train.compile:
        compile_models(models, use_device(env), env.world == 1)
    engine = build_engine(TeamModule(models, nn.ModuleDict(controller.aux)), build_optimizer(groups, cfg.train), cfg.train, cfg.dist, layout, env)
    controller.when_aux_removed(lambda: engine.freeze_groups(AUX_GROUP))
    return TrainStep(team, models, main_model_name(team), objective, tap, controller, engine)
