"""The controller applies each policy's bits, alpha and phase to the students' layers; bad
schedules are rejected when the config is read (epochs, fractions) or when the controller
is built (step counts), with a message that names the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distq.config import ConfigError, load_config
from distq.controller import Clock, Event, PrecisionController, Student
from distq.models.build import build_model
from distq.quant.layers import QAct, QConv2d, quant_layers

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FP = 32
SPE = 10  # steps per epoch of every controller built here


def make_cfg(config: str | None, *overrides: str):
    return load_config(CONFIGS / config if config else None, ["model.width=4", "model.small_input=true", *overrides])


def make_student(cfg, name: str = "model", w_bits: int | None = None, a_bits: int | None = None) -> Student:
    torch.manual_seed(0)
    w = cfg.quant.w_bits if w_bits is None else w_bits
    a = cfg.quant.a_bits if a_bits is None else a_bits
    return Student(name, build_model(cfg.model, cfg.quant, 10, w_bits=w, a_bits=a), w, a)


def make_controller(cfg, students: list[Student] | None = None) -> PrecisionController:
    students = students or [make_student(cfg)]
    return PrecisionController(cfg, Clock(SPE, SPE * cfg.train.epochs), students)


def bits_of(model) -> tuple[set[int], set[int]]:
    """(weight bits, activation bits) over the quantized layers of ``model``."""
    w = {layer.bits for _, layer in quant_layers(model) if not isinstance(layer, QAct)}
    a = {layer.bits for _, layer in quant_layers(model) if isinstance(layer, QAct)}
    return w, a


def bits_at(ctl: PrecisionController, step: int, student: int = 0) -> tuple[int, int]:
    ctl.on_event(Event.BATCH_START, step)
    w, a = bits_of(ctl.students[student].model)
    assert len(w) == 1 and len(a) == 1, (w, a)
    return w.pop(), a.pop()


# --- each policy drives the layers ----------------------------------------------------------


def test_progressive_sets_bits_per_stage():
    cfg = make_cfg("digits_resnet18_w2a2_progressive.yaml")  # 32 -> 8 -> 4 -> 2, 3 epochs each, 15 epochs
    ctl = make_controller(cfg)
    expected = {0: (FP, FP), 29: (FP, FP), 30: (8, 8), 59: (8, 8), 60: (4, 4), 89: (4, 4), 90: (2, 2), 149: (2, 2)}
    assert {step: bits_at(ctl, step) for step in expected} == expected
    assert [ctl.precision_at(s).stage for s in (0, 29, 30, 60, 90, 149)] == [0, 0, 1, 2, 3, 3]
    # Latent weights are shared across stages: changing bits never swaps a parameter.
    params = [id(p) for p in ctl.students[0].model.parameters()]
    bits_at(ctl, 5)
    assert [id(p) for p in ctl.students[0].model.parameters()] == params


def test_progressive_separate_weight_and_activation_sequences():
    cfg = make_cfg(
        None, "quant.w_bits=2", "quant.a_bits=4", "train.epochs=10",
        "precision.progressive={w_bits: [32, 4, 2], a_bits: [8, 8, 4], stages: [2ep, 0.3dur]}",
    )
    ctl = make_controller(cfg)
    assert [bits_at(ctl, s) for s in (0, 19, 20, 49, 50, 99)] == [(FP, 8), (FP, 8), (4, 8), (4, 8), (2, 4), (2, 4)]


def test_progressive_floor_serves_two_students():
    cfg = make_cfg(
        "digits_resnet18_w4a4_guided.yaml",
        "guided.students=[{w_bits: 4, a_bits: 4}, {w_bits: 2, a_bits: 2}]",
        "precision.progressive={w_bits: [32, 8, 4, 2], a_bits: [32, 8, 4, 2], stages: [1ep, 1ep, 1ep]}",
    )
    students = [make_student(cfg, s.name, s.w_bits, s.a_bits) for s in cfg.guided.students]
    ctl = make_controller(cfg, students)
    for step, four, two in [(0, (FP, FP), (FP, FP)), (10, (8, 8), (8, 8)), (20, (4, 4), (4, 4)), (30, (4, 4), (2, 2))]:
        assert (bits_at(ctl, step, 0), bits_at(ctl, step, 1)) == (four, two), step
    scalars = ctl.scalars()
    assert scalars["precision/w_bits/student_w4a4"] == 4 and scalars["precision/w_bits/student_w2a2"] == 2
    assert scalars["precision/stage"] == 3


def test_two_stage_quantizes_activations_in_the_second_stage():
    cfg = make_cfg("digits_resnet18_w2a2_two_stage.yaml", "train.epochs=10")  # weights_only 0.5dur = 50 steps
    ctl = make_controller(cfg)
    assert {s: bits_at(ctl, s) for s in (0, 49, 50, 99)} == {0: (2, FP), 49: (2, FP), 50: (2, 2), 99: (2, 2)}
    assert [ctl.precision_at(s).stage for s in (49, 50)] == [0, 1]


def test_aqe_alpha_reaches_every_layer_and_weights_are_clipped():
    cfg = make_cfg("digits_resnet18_w1a2_aqe.yaml", "train.epochs=10", "precision.aqe.end=0.5dur")
    ctl = make_controller(cfg)
    model = ctl.students[0].model
    for step, alpha in [(0, 0.5), (25, 0.75), (50, 1.0), (99, 1.0)]:
        ctl.on_event(Event.BATCH_START, step)
        assert {layer.alpha for _, layer in quant_layers(model)} == {alpha}
        assert ctl.scalars()["aqe/alpha"] == alpha
    conv = next(layer for _, layer in quant_layers(model) if isinstance(layer, QConv2d))
    with torch.no_grad():
        conv.weight.fill_(3.0)
        conv.weight[0].fill_(-2.0)
    ctl.on_event(Event.AFTER_STEP, 50)
    assert conv.weight.max().item() == 1.0 and conv.weight.min().item() == -1.0


def test_dorefa_weights_are_not_clipped():
    cfg = make_cfg("digits_w4a4.yaml")
    ctl = make_controller(cfg)
    conv = next(layer for _, layer in quant_layers(ctl.students[0].model) if isinstance(layer, QConv2d))
    with torch.no_grad():
        conv.weight.fill_(3.0)
    ctl.on_event(Event.AFTER_STEP, 0)
    assert conv.weight.max().item() == 3.0
    assert "aqe/alpha" not in ctl.scalars()


def test_cyclic_alternates_full_and_low_precision_one_bit_down_per_level():
    # Levels 3, 2, 1; per level one cycle of 1 epoch fp + 2 epochs lp: 90 of 100 steps.
    cfg = make_cfg(
        None, "quant.w_bits=1", "quant.a_bits=1", "train.epochs=10",
        "precision.cyclic={start_bits: 3, cycles: 1, fp_length: 1ep, lp_length: 2ep}",
    )
    ctl = make_controller(cfg)
    expected = {
        0: (FP, FP), 9: (FP, FP), 10: (3, 1), 29: (3, 1),
        30: (FP, FP), 40: (2, 1), 60: (FP, FP), 70: (1, 1), 89: (1, 1), 90: (1, 1), 99: (1, 1),
    }
    assert {s: bits_at(ctl, s) for s in expected} == expected
    assert [ctl.precision_at(s).phase for s in (0, 10, 30, 40, 95)] == ["fp", "lp", "fp", "lp", "lp"]
    assert [ctl.precision_at(s).stage for s in (0, 29, 30, 60, 95)] == [0, 0, 1, 2, 2]


def test_no_policy_keeps_the_target_bits():
    cfg = make_cfg("digits_w4a4.yaml", "quant.w_bits=3", "quant.a_bits=2")
    ctl = make_controller(cfg)
    assert ctl.policies == []
    assert bits_at(ctl, 0) == bits_at(ctl, 149) == (3, 2)
    assert ctl.scalars() == {"precision/w_bits": 3, "precision/a_bits": 2, "precision/stage": 0}


# --- rejected when the config is read ---------------------------------------------------------------

PQ = "digits_resnet18_w2a2_progressive.yaml"
SP = "digits_resnet18_w2a2_stochastic.yaml"
CYCLIC = "digits_resnet18_w1a1_cyclic.yaml"
AUX = "digits_resnet18_w2a2_aux.yaml"

BAD_CONFIGS = {
    "stages-sum-longer-than-run": (
        PQ, ["train.epochs=8"],
        "precision.progressive.stages add up to 9 epochs, not less than train.epochs=8: the last stage would never run",
    ),
    "stages-fill-the-run": (
        PQ, ["precision.progressive.stages=[0.5dur, 0.25dur, 0.25dur]"],
        "precision.progressive.stages add up to 15 epochs, not less than train.epochs=15",
    ),
    "one-stage-longer-than-run": (
        PQ, ["precision.progressive={w_bits: [32, 2], a_bits: [32, 2], stages: [20ep]}"],
        "precision.progressive.stages[0]='20ep' is longer than the run (train.epochs=15): shorten it or train longer",
    ),
    "weight-bits-increase": (
        PQ, ["precision.progressive.w_bits=[32, 4, 8, 2]"],
        "precision.progressive.w_bits=[32, 4, 8, 2] increases: a progressive sequence must go down, e.g. [32, 8, 4, 2]",
    ),
    "act-bits-increase": (
        PQ, ["precision.progressive.a_bits=[8, 8, 2, 4]", "quant.a_bits=4"],
        "precision.progressive.a_bits=[8, 8, 2, 4] increases",
    ),
    "sequence-ends-above-target": (
        PQ, ["precision.progressive={w_bits: [32, 8, 4], a_bits: [32, 8, 2], stages: [3ep, 3ep]}"],
        "precision.progressive.w_bits ends at 4 bits but quant.w_bits=2: end the sequence at the target bit-width",
    ),
    "sequence-length-mismatch": (
        PQ, ["precision.progressive.stages=[3ep, 3ep]"],
        "precision.progressive.w_bits has 4 entries but precision.progressive.stages has 2",
    ),
    "p0-above-one": (SP, ["precision.stochastic.p0=1.5"], "precision.stochastic.p0=1.5 must be in [0, 1]"),
    "p0-below-zero": (SP, ["precision.stochastic.p0=-0.1"], "precision.stochastic.p0=-0.1 must be in [0, 1]"),
    "sp-ramp-longer-than-run": (SP, ["precision.stochastic.ramp=16ep"], "precision.stochastic.ramp='16ep' is longer than the run"),
    "guided-without-students": (
        "digits_resnet18_w4a4_guided.yaml", ["guided.students=[]"],
        "guided.students is empty: a guided config needs at least one student, e.g. [{w_bits: 4, a_bits: 4}]",
    ),
    "guided-section-empty": (None, ["guided={}"], "guided.students is empty"),
    "cyclic-zero-cycles": (CYCLIC, ["precision.cyclic.cycles=0"], "precision.cyclic.cycles=0: cyclic training needs at least 1 cycle"),
    "cyclic-longer-than-run": (
        CYCLIC, ["precision.cyclic.cycles=2"],
        "precision.cyclic needs 24 epochs (4 bit depths x 2 cycles x (fp_length + lp_length)) but train.epochs=18",
    ),
    "cyclic-start-below-target": (CYCLIC, ["quant.w_bits=2", "quant.a_bits=2", "precision.cyclic.start_bits=1"], "precision.cyclic.start_bits=1 must be in 2..8"),
    "progressive-with-cyclic": (
        CYCLIC, ["precision.progressive={w_bits: [32, 1], stages: [1ep]}"],
        "precision.progressive cannot be combined with precision.cyclic (both set the bit-width trajectory): remove one of them",
    ),
    "stochastic-with-cyclic": (
        CYCLIC, ["precision.stochastic={}"],
        "precision.stochastic cannot be combined with precision.cyclic (cyclic training's full-precision phases leave nothing to sample)",
    ),
    "two-stage-with-cyclic": (CYCLIC, ["precision.two_stage={}"], "precision.two_stage cannot be combined with precision.cyclic"),
    "aqe-schedule-with-dorefa": (
        "digits_resnet18_w1a2_aqe.yaml", ["quant.method=dorefa"],
        "precision.aqe schedules AQE's alpha but quant.method='dorefa': set quant.method=aqe",
    ),
    "aqe-alpha0-outside": ("digits_resnet18_w1a2_aqe.yaml", ["precision.aqe.alpha0=1.2"], "precision.aqe.alpha0=1.2 must be in [0, 1]"),
    "two-stage-whole-run": (
        "digits_resnet18_w2a2_two_stage.yaml", ["precision.two_stage.weights_only=1dur"],
        "precision.two_stage.weights_only='1dur' leaves no time for the second stage",
    ),
    "two-stage-fp-activations": (
        "digits_resnet18_w2a2_two_stage.yaml", ["quant.a_bits=32"],
        "precision.two_stage needs quantized activations, but the activation target is 32 bits",
    ),
    "aux-ends-with-the-run": (
        AUX, ["precision.aux_branch.end=1dur"],
        "precision.aux_branch.end='1dur' must come before the end of the run (train.epochs=15): the branch is removed only once f reaches 0",
    ),
    "aux-ends-before-start": (AUX, ["precision.aux_branch.start=5ep", "precision.aux_branch.end=4ep"], "precision.aux_branch.end='4ep' must come after precision.aux_branch.start='5ep'"),
    "not-a-duration": (SP, ["precision.stochastic.ramp=80%"], "precision.stochastic.ramp='80%' is not a duration"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_schedule_is_rejected_with_its_message(case):
    config, overrides, message = BAD_CONFIGS[case]
    with pytest.raises(ConfigError) as info:
        make_cfg(config, *overrides)
    assert message in str(info.value)


def test_every_shipped_recipe_passes_validation_and_builds_a_controller():
    for path in sorted(CONFIGS.glob("digits_*.yaml")):
        cfg = load_config(path) if "alexnet" in path.name else make_cfg(path.name)  # AlexNet has no width option
        students = [make_student(cfg, s.name, s.w_bits, s.a_bits) for s in cfg.guided.students] if cfg.guided else None
        ctl = make_controller(cfg, students)
        ctl.on_event(Event.BATCH_START, 0)


# --- step counts: rejected when the controller is built -------------------------------------------

BAD_STEPS = {
    "sp-ramp": (SP, ["precision.stochastic.ramp=151ba"], "precision.stochastic.ramp='151ba' is longer than the run (150 steps): shorten it or train longer"),
    "aqe-end": ("digits_resnet18_w1a2_aqe.yaml", ["precision.aqe.end=1000ba"], "precision.aqe.end='1000ba' is longer than the run (150 steps)"),
    "pq-stage": (PQ, ["precision.progressive.stages=[3ep, 200ba, 3ep]"], "precision.progressive.stages[1]='200ba' is longer than the run (150 steps)"),
    "pq-stages-sum": (
        PQ, ["precision.progressive.stages=[60ba, 60ba, 30ba]"],
        "precision.progressive.stages add up to 150 steps, not less than the run's 150: the last stage would never run",
    ),
    "two-stage": ("digits_resnet18_w2a2_two_stage.yaml", ["precision.two_stage.weights_only=150ba"], "precision.two_stage.weights_only='150ba' leaves no time for the second stage"),
    "aux-end": (AUX, ["precision.aux_branch.end=150ba"], "precision.aux_branch.end='150ba' must come before the end of the run (150 steps)"),
    "aux-end-before-start": (AUX, ["precision.aux_branch.start=50ba", "precision.aux_branch.end=40ba"], "precision.aux_branch.end='40ba' must come after precision.aux_branch.start='50ba'"),
    "cyclic": (
        CYCLIC, ["train.epochs=15", "precision.cyclic={start_bits: 3, cycles: 2, fp_length: 20ba, lp_length: 20ba}"],
        "precision.cyclic needs 240 steps but the run has 150: fewer cycles or shorter phases",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_STEPS))
def test_step_durations_longer_than_the_run_are_rejected_by_the_controller(case):
    config, overrides, message = BAD_STEPS[case]
    cfg = make_cfg(config, "train.epochs=15", *overrides)  # steps are unknown when the config is read
    with pytest.raises(ConfigError) as info:
        make_controller(cfg)
    assert message in str(info.value)
