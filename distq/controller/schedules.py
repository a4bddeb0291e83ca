"""Every precision schedule as a pure function of the optimizer step.

No hidden counters: the caller passes the step, so the same step gives the same value
on every rank and after every resume. Lengths and boundaries are in steps.
"""

from __future__ import annotations

import bisect
import itertools
import math

import torch

from distq.quant.functional import FULL_PRECISION


def stage_index(step: int, stage_lengths: list[int]) -> int:
    """Index of the stage ``step`` falls in; the stage after the last length runs to the end."""
    boundaries = list(itertools.accumulate(stage_lengths))
    return bisect.bisect_right(boundaries, step)


def progressive_bits(step: int, sequence: list[int], stage_lengths: list[int]) -> int:
    """PQ: ``sequence[i]`` during stage i (e.g. 32 -> 8 -> 4 -> 2)."""
    return sequence[min(stage_index(step, stage_lengths), len(sequence) - 1)]


def two_stage_act_bits(step: int, weights_only_steps: int, target: int) -> int:
    """TS: full-precision activations during the first stage, then the target bits."""
    return FULL_PRECISION if step < weights_only_steps else target


def linear_ramp(step: int, start_value: float, ramp_steps: int, end_value: float = 1.0) -> float:
    """``start_value`` at step 0, rising linearly to ``end_value`` at ``ramp_steps``, then flat."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return end_value
    return start_value + (end_value - start_value) * step / ramp_steps


def sp_probability(step: int, p0: float, ramp_steps: int) -> float:
    """SP: probability that a unit is quantized, p0 -> 1 over the ramp."""
    return linear_ramp(step, p0, ramp_steps)


def aqe_alpha(step: int, alpha0: float, end_steps: int) -> float:
    """AQE: alpha0 (0.5: AQE equals STE) -> 1 (truly quantized) at ``end_steps``."""
    return linear_ramp(step, alpha0, end_steps)


def aux_factor_cosine(step: int, start: int, end: int) -> float:
    """Aux branch: 1 until ``start``, cosine down to exactly 0 at ``end``."""
    if step < start:
        return 1.0
    if step >= end:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - start) / (end - start)))


def aux_factor_step(step: int, start: int, end: int, halve_every: int) -> float:
    """Aux branch: 1 until ``start + halve_every`` (it decays from 1, as the cosine does), then
    halved every ``halve_every`` steps, exactly 0 at ``end``."""
    if step < start:
        return 1.0
    if step >= end:
        return 0.0
    return 0.5 ** ((step - start) // halve_every)


def cyclic_levels(start_bits: int, target: int) -> list[int]:
    """Bit depths of the cyclic schedule's steps: one bit less per step, down to the target."""
    return list(range(start_bits, target - 1, -1))


def cyclic_bits(step: int, levels: list[int], cycles: int, fp_steps: int, lp_steps: int) -> tuple[int, str]:
    """Cyclic training: ``(bits, phase)`` at ``step``.

    For each level: ``cycles`` rounds of a full-precision phase (bits 32) then a low-precision
    phase at that level. After the last round of the last level, the last level holds.
    """
    period = fp_steps + lp_steps
    per_level = cycles * period
    index = step // per_level if per_level else len(levels)
    if index >= len(levels):
        return levels[-1], "lp"
    within = (step - index * per_level) % period
    return (FULL_PRECISION, "fp") if within < fp_steps else (levels[index], "lp")


def cyclic_length(levels: list[int], cycles: int, fp_steps: int, lp_steps: int) -> int:
    return len(levels) * cycles * (fp_steps + lp_steps)


def sp_mask(seed: int, step: int, num_units: int, p: float) -> torch.Tensor:
    """SP: which units are quantized at ``step`` (bool tensor).

    Drawn from a generator seeded with (seed, step) only, so every rank, and a resumed
    run, draws exactly the same subset without any communication.
    """
    if p >= 1.0:
        return torch.ones(num_units, dtype=torch.bool)
    generator = torch.Generator().manual_seed((seed * 2_654_435_761 + step * 40_503 + 1) % (2**63))
    return torch.rand(num_units, generator=generator) < p
