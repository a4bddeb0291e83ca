"""Stochastic precision (SP): every step a random subset of units (residual blocks, or layers) is
quantized and the rest run in full precision; the probability p that a unit is quantized rises
from p0 to 1 (docs/methods.md, "Stochastic precision").

The subset is drawn from a generator seeded with (seed, step) only, so every data-parallel rank
and every resumed run draws the same one without communicating.
"""

from __future__ import annotations

import torch.nn as nn

from distq.controller import schedules
from distq.controller.policies.base import Policy, Targets
from distq.controller.precision import Precision
from distq.controller.timeline import Clock
from distq.models.resnet import DistqBasicBlock, DistqBottleneck
from distq.models.team import Member
from distq.quant.layers import QuantState, quant_layers

BLOCK_TYPES = (DistqBasicBlock, DistqBottleneck)


def quant_units(model: nn.Module, unit: str) -> list[list[QuantState]]:
    """Groups of quantized layers that stochastic precision switches together:
    every residual block is one unit ("block"), or every layer ("layer"). Layers outside
    any block (e.g. the stem activation) are units of their own."""
    layers = list(quant_layers(model))
    if unit == "layer":
        return [[layer] for _, layer in layers]
    blocks = [name for name, m in model.named_modules() if isinstance(m, BLOCK_TYPES)]
    units: dict[str, list[QuantState]] = {}
    for name, layer in layers:
        owner = next((b for b in blocks if name.startswith(b + ".")), name)
        units.setdefault(owner, []).append(layer)
    return list(units.values())


class Stochastic(Policy):
    key = "stochastic"

    def __init__(self, cfg, clock: Clock, targets: Targets):
        super().__init__(cfg, clock, targets)
        sp = cfg.precision.stochastic
        self.p0, self.unit = sp.p0, sp.unit
        self.ramp = clock.steps(sp.ramp, "precision.stochastic.ramp")

    def contribute(self, step: int, p: Precision) -> None:
        p.sp_p = schedules.sp_probability(step, self.p0, self.ramp)

    def bind(self, students: list[Member]) -> None:
        super().bind(students)
        self.units = [quant_units(s.model, self.unit) for s in students]

    def on_batch_start(self, step: int, p: Precision) -> None:
        if p.sp_p >= 1.0:
            return  # the controller has just quantized every layer
        for units in self.units:
            for unit, quantized in zip(units, schedules.sp_mask(self.seed, step, len(units), p.sp_p).tolist()):
                for layer in unit:
                    layer.quantize = quantized

    def on_epoch_end(self, step: int, p: Precision) -> None:
        """Validation sees the whole network quantized: SP samples during training steps only."""
        for student in self.students:
            for _, layer in quant_layers(student.model):
                layer.quantize = True

    def scalars(self, p: Precision) -> dict[str, float]:
        return {"precision/sp_p": p.sp_p}
