"""Precision policies: small objects around the pure schedules of ``schedules.py``.

Each policy contributes its part of the ``Precision`` of a step; the controller combines
them. Bit schedules give *floors*: a model trains at ``max(floor, its target bits)``, so
one schedule (e.g. 32 -> 8 -> 4 -> 2) serves a 4-bit and a 2-bit student at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from distq.config.loader import ConfigError
from distq.controller import schedules
from distq.controller.timeline import Clock
from distq.controller.validate import AUX_END_WHY
from distq.quant.functional import FULL_PRECISION


class Event(Enum):
    """Where policies fire. The training loop, as pseudocode::

        FIT_START
        for epoch in epochs:
            EPOCH_START
            for batch in data:
                BATCH_START   # the controller sets bits, SP subset, alpha, aux factor for this step
                forward, backward, optimizer step
                AFTER_STEP    # AQE clips weights to [-1, 1]
            EPOCH_END         # validation, checkpoint
        FIT_END
    """

    FIT_START = "fit_start"
    EPOCH_START = "epoch_start"
    BATCH_START = "batch_start"
    AFTER_STEP = "after_step"
    EPOCH_END = "epoch_end"
    FIT_END = "fit_end"


@dataclass
class Precision:
    """Everything the controller decides for one step."""

    w_floor: int = 1
    """Weights train at max(w_floor, target): 32 means full precision."""
    a_floor: int = 1
    sp_p: float = 1.0
    """Probability that a unit is quantized (1: all)."""
    alpha: float | None = None
    """AQE mixing factor, None when no AQE schedule runs."""
    aux_f: float | None = None
    """Auxiliary-branch factor, None when no branch is configured."""
    phase: str = "lp"
    """"fp" during a full-precision phase of cyclic training."""
    stage: int = 0
    """Index of the current PQ stage / TS stage / cyclic bit depth."""


class Progressive:
    def __init__(self, cfg, clock: Clock):
        self.w_seq, self.a_seq = cfg.w_bits, cfg.a_bits
        self.lengths = [clock.steps(s, f"precision.progressive.stages[{i}]") for i, s in enumerate(cfg.stages)]
        if sum(self.lengths) >= clock.total_steps:
            raise ConfigError(
                f"precision.progressive.stages add up to {sum(self.lengths)} steps, not less than the run's {clock.total_steps}: "
                f"the last stage would never run"
            )

    def contribute(self, step: int, p: Precision) -> None:
        p.stage = schedules.stage_index(step, self.lengths)
        if self.w_seq:
            p.w_floor = max(p.w_floor, schedules.progressive_bits(step, self.w_seq, self.lengths))
        if self.a_seq:
            p.a_floor = max(p.a_floor, schedules.progressive_bits(step, self.a_seq, self.lengths))


class TwoStage:
    def __init__(self, cfg, clock: Clock):
        self.weights_only = clock.steps(cfg.weights_only, "precision.two_stage.weights_only")
        if self.weights_only >= clock.total_steps:
            raise ConfigError(f"precision.two_stage.weights_only={cfg.weights_only!r} leaves no time for the second stage")

    def contribute(self, step: int, p: Precision) -> None:
        p.a_floor = max(p.a_floor, schedules.two_stage_act_bits(step, self.weights_only, 1))
        p.stage = max(p.stage, int(step >= self.weights_only))


class Stochastic:
    def __init__(self, cfg, clock: Clock):
        self.p0, self.unit = cfg.p0, cfg.unit
        self.ramp = clock.steps(cfg.ramp, "precision.stochastic.ramp")

    def contribute(self, step: int, p: Precision) -> None:
        p.sp_p = schedules.sp_probability(step, self.p0, self.ramp)


class AqeAlpha:
    def __init__(self, cfg, clock: Clock):
        self.alpha0 = cfg.alpha0
        self.end = clock.steps(cfg.end, "precision.aqe.end")

    def contribute(self, step: int, p: Precision) -> None:
        p.alpha = schedules.aqe_alpha(step, self.alpha0, self.end)


class AuxDecay:
    def __init__(self, cfg, clock: Clock):
        self.decay = cfg.decay
        self.start = clock.steps(cfg.start, "precision.aux_branch.start")
        self.end = clock.steps(cfg.end, "precision.aux_branch.end")
        if self.end >= clock.total_steps:
            raise ConfigError(f"precision.aux_branch.end={cfg.end!r} must come before the end of the run ({clock.total_steps} steps): {AUX_END_WHY}")
        if self.end <= self.start:
            raise ConfigError(f"precision.aux_branch.end={cfg.end!r} must come after precision.aux_branch.start={cfg.start!r}")
        self.halve_every = max(1, clock.steps(cfg.halve_every, "precision.aux_branch.halve_every"))

    def contribute(self, step: int, p: Precision) -> None:
        if self.decay == "cosine":
            p.aux_f = schedules.aux_factor_cosine(step, self.start, self.end)
        else:
            p.aux_f = schedules.aux_factor_step(step, self.start, self.end, self.halve_every)


class Cyclic:
    def __init__(self, cfg, clock: Clock, w_target: int):
        self.levels = schedules.cyclic_levels(cfg.start_bits, w_target)
        self.cycles = cfg.cycles
        self.fp = clock.steps(cfg.fp_length, "precision.cyclic.fp_length")
        self.lp = clock.steps(cfg.lp_length, "precision.cyclic.lp_length")
        total = schedules.cyclic_length(self.levels, self.cycles, self.fp, self.lp)
        if total > clock.total_steps:
            raise ConfigError(f"precision.cyclic needs {total} steps but the run has {clock.total_steps}: fewer cycles or shorter phases")

    def contribute(self, step: int, p: Precision) -> None:
        bits, p.phase = schedules.cyclic_bits(step, self.levels, self.cycles, self.fp, self.lp)
        level = min(step // max(1, self.cycles * (self.fp + self.lp)), len(self.levels) - 1)
        p.stage = level
        p.w_floor = max(p.w_floor, bits)
        # Activations follow the full-precision phases; their depth is the target's.
        if bits == FULL_PRECISION:
            p.a_floor = FULL_PRECISION


def build_policies(cfg, clock: Clock, w_target: int) -> list:
    """The configured policies, in the order their contributions combine."""
    pc = cfg.precision
    policies = []
    if pc.progressive is not None:
        policies.append(Progressive(pc.progressive, clock))
    if pc.two_stage is not None:
        policies.append(TwoStage(pc.two_stage, clock))
    if pc.cyclic is not None:
        policies.append(Cyclic(pc.cyclic, clock, w_target))
    if pc.stochastic is not None:
        policies.append(Stochastic(pc.stochastic, clock))
    if pc.aqe is not None:
        policies.append(AqeAlpha(pc.aqe, clock))
    if pc.aux_branch is not None:
        policies.append(AuxDecay(pc.aux_branch, clock))
    return policies
