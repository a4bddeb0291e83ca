"""The ``precision`` section: one dataclass per precision policy of ``distq.controller.policies``.

Each dataclass checks its own values (bit-widths, ranges, durations) when it is built; whatever
depends on the run as a whole (its length in steps, the target bit-widths, the other policies)
is checked by the policy itself when the controller builds it. Adding a policy means a
dataclass here, a field of ``PrecisionConfig`` and its module in ``distq/controller/policies/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from distq.config.checks import check_fraction
from distq.config.duration import Duration, parse_duration
from distq.quant.functional import FULL_PRECISION, check_bits


@dataclass(kw_only=True)
class ProgressiveConfig:
    """Progressive quantisation (PQ): bit-widths step down a sequence, e.g. 32 -> 8 -> 4 -> 2."""

    w_bits: list[int] = field(default_factory=list)
    """Weight bit sequence (non-increasing, ending at the target); empty leaves weights at their target."""
    a_bits: list[int] = field(default_factory=list)
    """Activation bit sequence (non-increasing, ending at the target); empty leaves activations at their target."""
    stages: list[Duration] = field(default_factory=list)
    """Length of every stage but the last (which runs to the end), e.g. ["10ep", "10ep", "10ep"]."""

    def __post_init__(self):
        if not self.w_bits and not self.a_bits:
            raise ValueError("precision.progressive has neither w_bits nor a_bits: give a sequence, e.g. w_bits: [32, 8, 4]")
        for name, sequence in (("w_bits", self.w_bits), ("a_bits", self.a_bits)):
            key = f"precision.progressive.{name}"
            for i, bits in enumerate(sequence):
                check_bits(bits, f"{key}[{i}]")
            if any(b > a for a, b in zip(sequence, sequence[1:])):
                raise ValueError(f"{key}={sequence} increases: a progressive sequence must go down, e.g. [32, 8, 4, 2]")
            if sequence and len(sequence) != len(self.stages) + 1:
                raise ValueError(
                    f"{key} has {len(sequence)} entries but precision.progressive.stages has {len(self.stages)}: "
                    f"give one stage length per entry except the last"
                )
        for i, stage in enumerate(self.stages):
            parse_duration(stage, f"precision.progressive.stages[{i}]")


@dataclass(kw_only=True)
class TwoStageConfig:
    """Two-stage optimisation (TS): quantized weights with full-precision activations first."""

    weights_only: Duration = "0.5dur"
    """Length of the first stage; activations are quantized from then on."""

    def __post_init__(self):
        parse_duration(self.weights_only, "precision.two_stage.weights_only")


@dataclass(kw_only=True)
class StochasticConfig:
    """Stochastic precision (SP): each step a random subset of units is quantized."""

    p0: float = 0.5
    """Probability that a unit is quantized at the start."""
    ramp: Duration = "0.8dur"
    """p rises linearly from p0 to 1 over this time; afterwards everything is quantized."""
    unit: Literal["block", "layer"] = "block"
    """The unit that is quantized or not as a whole: a residual block, or a single layer."""

    def __post_init__(self):
        check_fraction("precision.stochastic.p0", self.p0)
        parse_duration(self.ramp, "precision.stochastic.ramp")


@dataclass(kw_only=True)
class AqeScheduleConfig:
    """AQE alpha schedule: alpha rises linearly from alpha0 (AQE == STE at 0.5) to 1; needs quant.method=aqe."""

    alpha0: float = 0.5
    """alpha at the start of training: 0.5 makes AQE's gradient equal the straight-through estimator's."""
    end: Duration = "1dur"
    """Time at which alpha reaches 1 (the network is truly quantized from then on)."""

    def __post_init__(self):
        check_fraction("precision.aqe.alpha0", self.alpha0)
        parse_duration(self.end, "precision.aqe.end")


@dataclass(kw_only=True)
class AuxBranchConfig:
    """Auxiliary full-precision branch per quantized conv, output LP(x) + f * FP(x)."""

    decay: Literal["cosine", "step"] = "cosine"
    """cosine: f falls from 1 to 0 between start and end; step: f halves every halve_every, 0 at end."""
    start: Duration = "0ep"
    """When f starts to fall from 1."""
    end: Duration = "0.5dur"
    """When f reaches 0 and the branch is removed (before the end of the run)."""
    halve_every: Duration = "1ep"
    """Step decay only: interval between halvings."""

    def __post_init__(self):
        for name in ("start", "end", "halve_every"):
            parse_duration(getattr(self, name), f"precision.aux_branch.{name}")


@dataclass(kw_only=True)
class CyclicConfig:
    """Cyclic training: per bit depth (start_bits down to the target, one bit per step),
    `cycles` rounds of full-precision training then low-precision training."""

    start_bits: int = 4
    """Weight bit depth of the first level (1..8, at least the target); each level is one bit lower."""
    cycles: int = 2
    """Rounds of full-precision then low-precision training at every bit depth."""
    fp_length: Duration = "1ep"
    """Length of each full-precision phase."""
    lp_length: Duration = "1ep"
    """Length of each low-precision phase."""

    def __post_init__(self):
        check_bits(self.start_bits, "precision.cyclic.start_bits")
        if self.start_bits == FULL_PRECISION:
            raise ValueError("precision.cyclic.start_bits=32 is full precision: start the levels at 1..8 bits, e.g. 4")
        if self.cycles < 1:
            raise ValueError(f"precision.cyclic.cycles={self.cycles}: cyclic training needs at least 1 cycle")
        parse_duration(self.fp_length, "precision.cyclic.fp_length")
        parse_duration(self.lp_length, "precision.cyclic.lp_length")


@dataclass(kw_only=True)
class PrecisionConfig:
    """The precision controller's policies; an absent (null) section is off."""

    progressive: ProgressiveConfig | None = None
    two_stage: TwoStageConfig | None = None
    stochastic: StochasticConfig | None = None
    aqe: AqeScheduleConfig | None = None
    aux_branch: AuxBranchConfig | None = None
    cyclic: CyclicConfig | None = None
