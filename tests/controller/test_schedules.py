"""Every precision schedule as a pure function of the step, boundaries included, and the
durations ("30ep", "2000ba", "0.5dur") they are configured in."""

from __future__ import annotations

import math

import pytest
import torch

from distq.config import ConfigError
from distq.config.duration import parse_duration
from distq.controller import schedules
from distq.controller.timeline import Clock

FP = 32


# --- durations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,expected",
    [
        ("30ep", (30.0, "ep")),
        ("2000ba", (2000.0, "ba")),
        ("0.5dur", (0.5, "dur")),
        (".25dur", (0.25, "dur")),
        ("1.5ep", (1.5, "ep")),
        (" 3 ep ", (3.0, "ep")),
        (7, (7.0, "ep")),
        (2.5, (2.5, "ep")),
        # The schema stores durations as strings, so YAML's `stages: [3, 3]` arrives as "3".
        ("3", (3.0, "ep")),
        ("0", (0.0, "ep")),
    ],
)
def test_parse_duration(value, expected):
    assert parse_duration(value, "k") == expected


@pytest.mark.parametrize("value", ["30 epochs", "-1ep", "ep", "", "1e3ba", "3 ba ep", "0.5 of the run", True, None])
def test_parse_duration_rejects_with_the_key(value):
    with pytest.raises(ConfigError, match=r'precision\.x\.ramp=.* is not a duration: write e\.g\. "30ep" \(epochs\), "2000ba"'):
        parse_duration(value, "precision.x.ramp")


def test_clock_converts_every_unit_to_steps():
    clock = Clock(steps_per_epoch=10, total_steps=100)
    assert clock.steps("2ep", "k") == 20
    assert clock.steps(3, "k") == 30
    assert clock.steps("0.25dur", "k") == 25
    assert clock.steps("37ba", "k") == 37
    assert clock.steps("0.33ep", "k") == 3  # rounded to whole steps
    assert clock.steps("0.126dur", "k") == 13
    assert clock.steps("0ep", "k") == 0
    # Exactly the run is allowed; one step more is not.
    assert clock.steps("100ba", "k") == clock.steps("10ep", "k") == clock.steps("1dur", "k") == 100
    assert clock.epoch(25) == 2.5 and clock.epoch(0) == 0.0


@pytest.mark.parametrize("value", ["101ba", "11ep", "1.5dur", "10.06ep"])
def test_clock_rejects_durations_longer_than_the_run(value):
    clock = Clock(steps_per_epoch=10, total_steps=100)
    with pytest.raises(ConfigError, match=rf"precision\.stochastic\.ramp='{value}' is longer than the run \(100 steps: train\.epochs=10 of 10 steps\): shorten it or train longer"):
        clock.steps(value, "precision.stochastic.ramp")


# --- progressive (PQ) and two-stage (TS) ----------------------------------------------


def test_stage_index_boundaries():
    lengths = [10, 20, 5]  # stages end at steps 10, 30, 35; the last one runs to the end
    expected = {0: 0, 9: 0, 10: 1, 11: 1, 29: 1, 30: 2, 34: 2, 35: 3, 36: 3, 10_000: 3}
    assert {step: schedules.stage_index(step, lengths) for step in expected} == expected
    assert schedules.stage_index(0, []) == 0  # no stages: one stage for the whole run
    assert schedules.stage_index(0, [0, 4]) == 1  # a zero-length stage is skipped


def test_progressive_bits_at_stage_boundaries():
    sequence, lengths = [32, 8, 4, 2], [10, 20, 5]
    expected = {0: FP, 9: FP, 10: 8, 29: 8, 30: 4, 34: 4, 35: 2, 500: 2}
    assert {step: schedules.progressive_bits(step, sequence, lengths) for step in expected} == expected


def test_progressive_one_bit_at_a_time():
    # The seed-003 variant: 4 -> 3 -> 2 -> 1, every stage 3 steps.
    got = [schedules.progressive_bits(step, [4, 3, 2, 1], [3, 3, 3]) for step in range(12)]
    assert got == [4, 4, 4, 3, 3, 3, 2, 2, 2, 1, 1, 1]


def test_progressive_holds_the_last_entry_past_the_stages():
    assert schedules.progressive_bits(100, [32, 8], [10, 20]) == 8


def test_two_stage_act_bits():
    assert [schedules.two_stage_act_bits(s, 50, 2) for s in (0, 49, 50, 51, 10_000)] == [FP, FP, 2, 2, 2]
    assert schedules.two_stage_act_bits(0, 0, 1) == 1  # a zero-length first stage quantizes at once


# --- stochastic precision: p(t) ---------------------------------------------------------


def test_sp_probability_ramp():
    assert schedules.sp_probability(0, 0.5, 100) == 0.5
    assert schedules.sp_probability(50, 0.5, 100) == 0.75
    assert schedules.sp_probability(99, 0.5, 100) == pytest.approx(0.995)
    assert schedules.sp_probability(100, 0.5, 100) == 1.0
    assert schedules.sp_probability(10_000, 0.5, 100) == 1.0
    assert schedules.sp_probability(30, 0.0, 60) == 0.5
    assert schedules.sp_probability(0, 0.2, 0) == 1.0  # no ramp: everything quantized from the start
    ramp = [schedules.sp_probability(s, 0.3, 40) for s in range(60)]
    assert all(b >= a for a, b in zip(ramp, ramp[1:]))


def test_sp_mask_is_a_function_of_seed_and_step_only():
    torch.manual_seed(1)
    a = schedules.sp_mask(seed=3, step=17, num_units=64, p=0.5)
    torch.manual_seed(2)
    torch.rand(1000)  # the global RNG's state must not matter
    b = schedules.sp_mask(seed=3, step=17, num_units=64, p=0.5)
    assert a.dtype == torch.bool and a.shape == (64,)
    assert torch.equal(a, b)
    assert not torch.equal(a, schedules.sp_mask(seed=3, step=18, num_units=64, p=0.5))
    assert not torch.equal(a, schedules.sp_mask(seed=4, step=17, num_units=64, p=0.5))


def test_sp_mask_probability_ends():
    assert schedules.sp_mask(0, 5, 9, 1.0).all()
    assert schedules.sp_mask(0, 5, 9, 1.5).all()
    assert not schedules.sp_mask(0, 5, 9, 0.0).any()
    # Over many steps the quantized fraction is p.
    fraction = torch.stack([schedules.sp_mask(0, step, 100, 0.3) for step in range(200)]).float().mean().item()
    assert abs(fraction - 0.3) < 0.02


# --- AQE alpha(t) -----------------------------------------------------------------------


def test_aqe_alpha():
    assert schedules.aqe_alpha(0, 0.5, 80) == 0.5  # AQE equals STE at the start
    assert schedules.aqe_alpha(40, 0.5, 80) == 0.75
    assert schedules.aqe_alpha(79, 0.5, 80) == pytest.approx(0.5 + 0.5 * 79 / 80)
    assert schedules.aqe_alpha(79, 0.5, 80) < 1.0
    assert schedules.aqe_alpha(80, 0.5, 80) == 1.0  # truly quantized at the end
    assert schedules.aqe_alpha(81, 0.5, 80) == 1.0
    assert schedules.aqe_alpha(3, 1.0, 80) == 1.0


# --- auxiliary branch f(t) ---------------------------------------------------------------


def test_aux_factor_cosine():
    start, end = 10, 30
    assert schedules.aux_factor_cosine(0, start, end) == 1.0
    assert schedules.aux_factor_cosine(9, start, end) == 1.0
    assert schedules.aux_factor_cosine(10, start, end) == 1.0
    assert schedules.aux_factor_cosine(20, start, end) == pytest.approx(0.5)
    assert schedules.aux_factor_cosine(15, start, end) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    last = schedules.aux_factor_cosine(29, start, end)
    assert last == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 20))) and 0.0 < last < 0.01
    assert schedules.aux_factor_cosine(30, start, end) == 0.0  # exactly 0, so the branch can go
    assert schedules.aux_factor_cosine(31, start, end) == 0.0
    values = [schedules.aux_factor_cosine(s, start, end) for s in range(40)]
    assert all(b <= a for a, b in zip(values, values[1:]))


def test_aux_factor_step_halving():
    start, end, every = 10, 40, 5
    expected = {0: 1.0, 9: 1.0, 10: 1.0, 14: 1.0, 15: 0.5, 19: 0.5, 20: 0.25, 25: 0.125, 39: 0.5**5, 40: 0.0, 100: 0.0}
    assert {s: schedules.aux_factor_step(s, start, end, every) for s in expected} == expected
    # Starting at step 0 it still begins at 1, as the cosine does.
    assert schedules.aux_factor_step(0, 0, 8, 2) == schedules.aux_factor_cosine(0, 0, 8) == 1.0


# --- cyclic training ----------------------------------------------------------------------


def test_cyclic_levels():
    assert schedules.cyclic_levels(4, 1) == [4, 3, 2, 1]
    assert schedules.cyclic_levels(8, 6) == [8, 7, 6]
    assert schedules.cyclic_levels(2, 2) == [2]


def test_cyclic_bits_and_phase_at_boundaries():
    levels, cycles, fp, lp = [4, 3, 2, 1], 2, 3, 5  # period 8, 16 steps per level, 64 in all
    expected = {
        0: (FP, "fp"), 2: (FP, "fp"), 3: (4, "lp"), 7: (4, "lp"),  # level 4, cycle 1
        8: (FP, "fp"), 10: (FP, "fp"), 11: (4, "lp"), 15: (4, "lp"),  # level 4, cycle 2
        16: (FP, "fp"), 19: (3, "lp"), 31: (3, "lp"),  # level 3
        32: (FP, "fp"), 35: (2, "lp"),  # level 2
        48: (FP, "fp"), 50: (FP, "fp"), 51: (1, "lp"), 63: (1, "lp"),  # level 1, last cycle
        64: (1, "lp"), 65: (1, "lp"), 10_000: (1, "lp"),  # after the end the last level holds
    }
    assert {s: schedules.cyclic_bits(s, levels, cycles, fp, lp) for s in expected} == expected
    assert schedules.cyclic_length(levels, cycles, fp, lp) == 64


def test_cyclic_without_full_precision_phases():
    # fp_length 0: only low-precision phases, one level after the other.
    assert [schedules.cyclic_bits(s, [3, 2], 1, 0, 2)[0] for s in range(6)] == [3, 3, 2, 2, 2, 2]
