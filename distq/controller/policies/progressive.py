"""Progressive quantisation (PQ): the bit-widths step down a sequence, e.g. 32 -> 8 -> 4 -> 2,
each stage going on from the weights of the stage before (docs/methods.md, "Progressive")."""

from __future__ import annotations

from distq.config import ConfigError
from distq.controller import schedules
from distq.controller.policies.base import Policy, Targets
from distq.controller.precision import Precision
from distq.controller.timeline import Clock


class Progressive(Policy):
    key = "progressive"

    def __init__(self, cfg, clock: Clock, targets: Targets):
        super().__init__(cfg, clock, targets)
        pq = cfg.precision.progressive
        self.w_seq, self.a_seq = pq.w_bits, pq.a_bits
        for kind, sequence, target in (("w_bits", pq.w_bits, targets.w_bits), ("a_bits", pq.a_bits, targets.a_bits)):
            if sequence and sequence[-1] > target:
                raise ConfigError(
                    f"precision.progressive.{kind} ends at {sequence[-1]} bits but {targets.key}.{kind}={target}: "
                    f"end the sequence at the target bit-width"
                )
        self.lengths = [clock.steps(s, f"precision.progressive.stages[{i}]") for i, s in enumerate(pq.stages)]
        if sum(self.lengths) >= clock.total_steps:
            raise ConfigError(
                f"precision.progressive.stages add up to {clock.span(sum(self.lengths))}, not less than the run "
                f"({clock.run()}): the last stage would never run"
            )

    def contribute(self, step: int, p: Precision) -> None:
        p.stage = schedules.stage_index(step, self.lengths)
        if self.w_seq:
            p.w_floor = max(p.w_floor, schedules.progressive_bits(step, self.w_seq, self.lengths))
        if self.a_seq:
            p.a_floor = max(p.a_floor, schedules.progressive_bits(step, self.a_seq, self.lengths))
