"""What the precision policies decide for one step, and the rule that turns it into bits."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Precision:
    """Everything the policies decide for one step; each policy fills in its part."""

    w_floor: int = 1
    """Weights train at max(w_floor, target): 32 means full precision."""
    a_floor: int = 1
    """Activations train at max(a_floor, target)."""
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

    def bits(self, w_target: int, a_target: int) -> tuple[int, int]:
        """(weight, activation) bits of a model with these targets. Schedules give floors, so
        one schedule (e.g. 32 -> 8 -> 4 -> 2) serves a 4-bit and a 2-bit student at once."""
        return max(self.w_floor, w_target), max(self.a_floor, a_target)
