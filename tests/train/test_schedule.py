"""The learning-rate schedule against values worked out by hand: linear warm-up, then constant,
multistep or cosine over the rest of the run."""

from __future__ import annotations

import math

import pytest

from distq.config.schema import TrainConfig
from distq.train.schedule import lr_factor

SPE = 5  # steps per epoch


def factors(cfg: TrainConfig, steps) -> list[float]:
    return [lr_factor(step, SPE, cfg) for step in steps]


def test_warmup_rises_linearly_from_the_first_step_to_the_peak():
    cfg = TrainConfig(epochs=10, warmup_epochs=2, schedule="constant")
    # 10 warm-up steps: step s (0-based) trains at (s + 1) / 10 of the peak.
    assert factors(cfg, range(10)) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert factors(cfg, [10, 31, 49]) == [1.0, 1.0, 1.0]


def test_fractional_warmup():
    cfg = TrainConfig(epochs=4, warmup_epochs=0.4, schedule="constant")  # 2 steps of 5
    assert factors(cfg, [0, 1, 2]) == pytest.approx([0.5, 1.0, 1.0])


def test_multistep_multiplies_by_gamma_at_each_milestone_epoch():
    cfg = TrainConfig(epochs=10, schedule="multistep", milestones=[3, 7], gamma=0.1)
    assert factors(cfg, [0, 14, 15, 34, 35, 49]) == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_multistep_after_warmup():
    cfg = TrainConfig(epochs=10, warmup_epochs=1, schedule="multistep", milestones=[2], gamma=0.5)
    assert factors(cfg, [0, 4, 5, 9, 10]) == pytest.approx([0.2, 1.0, 1.0, 1.0, 0.5])


def test_cosine_without_warmup():
    cfg = TrainConfig(epochs=4, schedule="cosine")  # 20 steps
    # 0.5 (1 + cos(pi t)), t = step / 20
    assert factors(cfg, [0, 5, 10, 15, 20]) == pytest.approx([1.0, 0.8535533905932737, 0.5, 0.14644660940672627, 0.0])


def test_cosine_starts_after_warmup_and_reaches_zero_at_the_end():
    cfg = TrainConfig(epochs=10, warmup_epochs=2, schedule="cosine")  # warm-up 10 steps, cosine over 40
    assert factors(cfg, [9, 10, 20, 30, 50]) == pytest.approx([1.0, 1.0, 0.8535533905932737, 0.5, 0.0])
    assert lr_factor(40, SPE, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 4)))
