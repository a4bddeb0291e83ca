"""Two-stage optimisation (TS): quantized weights with full-precision activations first, then
quantized activations too (docs/methods.md, "Two-stage")."""

from __future__ import annotations

from distq.config import ConfigError
from distq.controller import schedules
from distq.controller.policies.base import Policy, Targets
from distq.controller.precision import Precision
from distq.controller.timeline import Clock
from distq.quant.functional import FULL_PRECISION


class TwoStage(Policy):
    key = "two_stage"

    def __init__(self, cfg, clock: Clock, targets: Targets):
        super().__init__(cfg, clock, targets)
        if targets.a_bits == FULL_PRECISION:
            raise ConfigError(
                f"precision.two_stage needs quantized activations, but the activation target is 32 bits: set {targets.key}.a_bits < 32"
            )
        value = cfg.precision.two_stage.weights_only
        self.weights_only = clock.steps(value, "precision.two_stage.weights_only")
        if self.weights_only >= clock.total_steps:
            raise ConfigError(f"precision.two_stage.weights_only={value!r} leaves no time for the second stage in the run ({clock.run()})")

    def contribute(self, step: int, p: Precision) -> None:
        p.a_floor = max(p.a_floor, schedules.two_stage_act_bits(step, self.weights_only, 1))
        p.stage = max(p.stage, int(step >= self.weights_only))
