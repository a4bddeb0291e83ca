"""Cyclic training: at every weight bit depth from ``start_bits`` down to the target, ``cycles``
rounds of a full-precision phase then a low-precision phase, each going on from the other's
weights (docs/methods.md, "Cyclic training")."""

from __future__ import annotations

from distq.config import ConfigError
from distq.controller import schedules
from distq.controller.policies.base import Policy, Targets
from distq.controller.precision import Precision
from distq.controller.timeline import Clock
from distq.quant.functional import FULL_PRECISION


class Cyclic(Policy):
    key = "cyclic"
    excludes = {
        "progressive": "both set the bit-width trajectory",
        "two_stage": "cyclic training already alternates full and low precision",
        "stochastic": "cyclic training's full-precision phases leave nothing to sample",
    }

    def __init__(self, cfg, clock: Clock, targets: Targets):
        super().__init__(cfg, clock, targets)
        cy = cfg.precision.cyclic
        if cy.start_bits < targets.w_bits:
            raise ConfigError(
                f"precision.cyclic.start_bits={cy.start_bits} must be in {targets.w_bits}..8 "
                f"(from 8 bits down to the target {targets.key}.w_bits={targets.w_bits})"
            )
        self.levels = schedules.cyclic_levels(cy.start_bits, targets.w_bits)
        self.cycles = cy.cycles
        self.fp = clock.steps(cy.fp_length, "precision.cyclic.fp_length")
        self.lp = clock.steps(cy.lp_length, "precision.cyclic.lp_length")
        total = schedules.cyclic_length(self.levels, self.cycles, self.fp, self.lp)
        if total > clock.total_steps:
            raise ConfigError(
                f"precision.cyclic needs {clock.span(total)}: {len(self.levels)} bit depths x {self.cycles} cycles x "
                f"(fp_length + lp_length), more than the run ({clock.run()}): fewer cycles, shorter phases or more epochs"
            )

    def contribute(self, step: int, p: Precision) -> None:
        bits, p.phase = schedules.cyclic_bits(step, self.levels, self.cycles, self.fp, self.lp)
        level = min(step // max(1, self.cycles * (self.fp + self.lp)), len(self.levels) - 1)
        p.stage = level
        p.w_floor = max(p.w_floor, bits)
        # Activations follow the full-precision phases; their depth is the target's.
        if bits == FULL_PRECISION:
            p.a_floor = FULL_PRECISION
