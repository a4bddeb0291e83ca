"""The controller applies each policy's bits, alpha and phase to the students' layers; a bad
schedule is rejected with a message that names the key: its own values when the config is read,
its fit with the run (targets, length in steps, other policies) when the policy is built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distq.config import ConfigError, load_config
from distq.controller import Clock, Event, PrecisionController
from distq.controller.policies import Aqe, AuxBranch, Cyclic, Progressive, Stochastic, TwoStage
from distq.models.team import build_team
from distq.quant.layers import QAct, QConv2d, quant_layers

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FP = 32
SPE = 10  # steps per epoch of every controller built here


def make_cfg(config: str | None, *overrides: str):
    return load_config(CONFIGS / config if config else None, ["model.width=4", "model.small_input=true", *overrides])


def clock_of(cfg) -> Clock:
    return Clock(SPE, SPE * cfg.train.epochs)


def make_controller(cfg) -> PrecisionController:
    """A controller driving freshly built models of ``cfg`` (10 classes)."""
    torch.manual_seed(0)
    return PrecisionController(cfg, clock_of(cfg), build_team(cfg, 10))


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
    ctl = make_controller(cfg)
    assert [s.name for s in ctl.students] == ["student_w4a4", "student_w2a2"]  # the guide is not driven
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
    assert ctl.bits_at(0) == ctl.bits_at(149) == {"model": (3, 2)}
    assert bits_at(ctl, 0) == bits_at(ctl, 149) == (3, 2)
    assert ctl.scalars() == {"precision/w_bits": 3, "precision/a_bits": 2, "precision/stage": 0}


# --- rejected: when the config is read, or when the policy is built ------------------------------------

PQ = "digits_resnet18_w2a2_progressive.yaml"
SP = "digits_resnet18_w2a2_stochastic.yaml"
CYCLIC = "digits_resnet18_w1a1_cyclic.yaml"
AUX = "digits_resnet18_w2a2_aux.yaml"
AQE = "digits_resnet18_w1a2_aqe.yaml"
TS = "digits_resnet18_w2a2_two_stage.yaml"
RUN_15 = "the run (150 steps: train.epochs=15 of 10 steps)"

# name -> (config, overrides, the error message or its start, where it is caught: "config" or "policy")
BAD = {
    # the section's own values, when the config is read
    "weight-bits-increase": (
        PQ, ["precision.progressive.w_bits=[32, 4, 8, 2]"],
        "precision.progressive.w_bits=[32, 4, 8, 2] increases: a progressive sequence must go down, e.g. [32, 8, 4, 2]", "config",
    ),
    "act-bits-increase": (PQ, ["precision.progressive.a_bits=[8, 8, 2, 4]", "quant.a_bits=4"], "precision.progressive.a_bits=[8, 8, 2, 4] increases", "config"),
    "sequence-bits-invalid": (
        PQ, ["precision.progressive.w_bits=[32, 9, 4, 2]"],
        "precision.progressive.w_bits[1]=9 is not a valid bit-width: use 1..8, or 32 for full precision", "config",
    ),
    "sequence-length-mismatch": (PQ, ["precision.progressive.stages=[3ep, 3ep]"], "precision.progressive.w_bits has 4 entries but precision.progressive.stages has 2", "config"),
    "progressive-without-sequences": (None, ["precision.progressive={stages: [1ep]}"], "precision.progressive has neither w_bits nor a_bits", "config"),
    "p0-above-one": (SP, ["precision.stochastic.p0=1.5"], "precision.stochastic.p0=1.5 must be in [0, 1]", "config"),
    "p0-below-zero": (SP, ["precision.stochastic.p0=-0.1"], "precision.stochastic.p0=-0.1 must be in [0, 1]", "config"),
    "not-a-duration": (SP, ["precision.stochastic.ramp=80%"], "precision.stochastic.ramp='80%' is not a duration", "config"),
    "guided-without-students": (
        "digits_resnet18_w4a4_guided.yaml", ["guided.students=[]"],
        "guided.students is empty: a guided config needs at least one student, e.g. [{w_bits: 4, a_bits: 4}]", "config",
    ),
    "guided-section-empty": (None, ["guided={}"], "guided.students is empty", "config"),
    "cyclic-zero-cycles": (CYCLIC, ["precision.cyclic.cycles=0"], "precision.cyclic.cycles=0: cyclic training needs at least 1 cycle", "config"),
    "cyclic-start-full-precision": (CYCLIC, ["precision.cyclic.start_bits=32"], "precision.cyclic.start_bits=32 is full precision", "config"),
    "aqe-alpha0-outside": (AQE, ["precision.aqe.alpha0=1.2"], "precision.aqe.alpha0=1.2 must be in [0, 1]", "config"),
    # the fit with the run, the targets and the other policies, when the policy is built
    "stages-sum-longer-than-run": (
        PQ, ["train.epochs=8"],
        "precision.progressive.stages add up to 90 steps (9 epochs), not less than the run (80 steps: train.epochs=8 of 10 steps): "
        "the last stage would never run", "policy",
    ),
    "stages-fill-the-run": (
        PQ, ["precision.progressive.stages=[0.5dur, 0.25dur, 0.25dur]"],  # 75 + 38 + 38 steps (37.5 rounds to 38)
        f"precision.progressive.stages add up to 151 steps (15.1 epochs), not less than {RUN_15}", "policy",
    ),
    "stages-in-steps-fill-the-run": (
        PQ, ["precision.progressive.stages=[60ba, 60ba, 30ba]"],
        f"precision.progressive.stages add up to 150 steps (15 epochs), not less than {RUN_15}: the last stage would never run", "policy",
    ),
    "one-stage-longer-than-run": (
        PQ, ["precision.progressive={w_bits: [32, 2], a_bits: [32, 2], stages: [20ep]}"],
        f"precision.progressive.stages[0]='20ep' is longer than {RUN_15}: shorten it or train longer", "policy",
    ),
    "stage-in-steps-longer-than-run": (PQ, ["precision.progressive.stages=[3ep, 200ba, 3ep]"], f"precision.progressive.stages[1]='200ba' is longer than {RUN_15}", "policy"),
    "sequence-ends-above-target": (
        PQ, ["precision.progressive={w_bits: [32, 8, 4], a_bits: [32, 8, 2], stages: [3ep, 3ep]}"],
        "precision.progressive.w_bits ends at 4 bits but quant.w_bits=2: end the sequence at the target bit-width", "policy",
    ),
    "sequence-ends-above-a-student": (
        "digits_resnet18_w4a4_guided.yaml",
        ["guided.students=[{w_bits: 4, a_bits: 4}, {w_bits: 2, a_bits: 2}]", "precision.progressive={w_bits: [32, 4], stages: [1ep]}"],
        "precision.progressive.w_bits ends at 4 bits but guided.students.w_bits=2", "policy",
    ),
    "sp-ramp-longer-than-run": (SP, ["precision.stochastic.ramp=16ep"], f"precision.stochastic.ramp='16ep' is longer than {RUN_15}", "policy"),
    "sp-ramp-in-steps": (SP, ["precision.stochastic.ramp=151ba"], f"precision.stochastic.ramp='151ba' is longer than {RUN_15}: shorten it or train longer", "policy"),
    "aqe-end-in-steps": (AQE, ["precision.aqe.end=1000ba"], f"precision.aqe.end='1000ba' is longer than {RUN_15}", "policy"),
    "cyclic-longer-than-run": (
        CYCLIC, ["precision.cyclic.cycles=2"],
        "precision.cyclic needs 240 steps (24 epochs): 4 bit depths x 2 cycles x (fp_length + lp_length), more than the run "
        "(180 steps: train.epochs=18 of 10 steps): fewer cycles, shorter phases or more epochs", "policy",
    ),
    "cyclic-in-steps": (
        CYCLIC, ["train.epochs=15", "precision.cyclic={start_bits: 3, cycles: 2, fp_length: 20ba, lp_length: 20ba}"],
        f"precision.cyclic needs 240 steps (24 epochs): 3 bit depths x 2 cycles x (fp_length + lp_length), more than {RUN_15}", "policy",
    ),
    "cyclic-start-below-target": (
        CYCLIC, ["quant.w_bits=2", "quant.a_bits=2", "precision.cyclic.start_bits=1"],
        "precision.cyclic.start_bits=1 must be in 2..8 (from 8 bits down to the target quant.w_bits=2)", "policy",
    ),
    "progressive-with-cyclic": (
        CYCLIC, ["precision.progressive={w_bits: [32, 1], stages: [1ep]}"],
        "precision.progressive cannot be combined with precision.cyclic (both set the bit-width trajectory): remove one of them", "policy",
    ),
    "stochastic-with-cyclic": (
        CYCLIC, ["precision.stochastic={}"],
        "precision.stochastic cannot be combined with precision.cyclic (cyclic training's full-precision phases leave nothing to sample)", "policy",
    ),
    "two-stage-with-cyclic": (CYCLIC, ["precision.two_stage={}"], "precision.two_stage cannot be combined with precision.cyclic", "policy"),
    "aqe-schedule-with-dorefa": (AQE, ["quant.method=dorefa"], "precision.aqe schedules AQE's alpha but quant.method='dorefa': set quant.method=aqe", "policy"),
    "two-stage-whole-run": (TS, ["precision.two_stage.weights_only=1dur"], f"precision.two_stage.weights_only='1dur' leaves no time for the second stage in {RUN_15}", "policy"),
    "two-stage-in-steps": (TS, ["precision.two_stage.weights_only=150ba"], "precision.two_stage.weights_only='150ba' leaves no time for the second stage", "policy"),
    "two-stage-fp-activations": (
        TS, ["quant.a_bits=32"], "precision.two_stage needs quantized activations, but the activation target is 32 bits: set quant.a_bits < 32", "policy",
    ),
    "aux-ends-with-the-run": (
        AUX, ["precision.aux_branch.end=1dur"],
        f"precision.aux_branch.end='1dur' must come before the end of {RUN_15}: the branch is removed only once f reaches 0", "policy",
    ),
    "aux-ends-in-steps-with-the-run": (AUX, ["precision.aux_branch.end=150ba"], f"precision.aux_branch.end='150ba' must come before the end of {RUN_15}", "policy"),
    "aux-ends-before-start": (
        AUX, ["precision.aux_branch.start=5ep", "precision.aux_branch.end=4ep"],
        "precision.aux_branch.end='4ep' must come after precision.aux_branch.start='5ep'", "policy",
    ),
    "aux-ends-in-steps-before-start": (
        AUX, ["precision.aux_branch.start=50ba", "precision.aux_branch.end=40ba"],
        "precision.aux_branch.end='40ba' must come after precision.aux_branch.start='50ba'", "policy",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_schedule_is_rejected_with_its_message(case):
    config, overrides, message, where = BAD[case]
    with pytest.raises(ConfigError) as info:
        cfg = make_cfg(config, *overrides)
        assert where == "policy", "the config was accepted"
        PrecisionController(cfg, clock_of(cfg))  # a plan's controller: no models needed
    assert str(info.value).startswith(message)
    if where == "config":  # caught before any run exists: the config alone is wrong
        with pytest.raises(ConfigError):
            make_cfg(config, *overrides)


# Every policy each shipped recipe runs, and the bits its (first) student ends at.
RECIPES = {
    "digits_w4a4.yaml": ([], (4, 4)),
    "digits_fp.yaml": ([], (FP, FP)),
    "digits_resnet18_w2a2_progressive.yaml": ([Progressive], (2, 2)),
    "digits_resnet18_w2a2_two_stage.yaml": ([TwoStage], (2, 2)),
    "digits_resnet18_w2a2_stochastic.yaml": ([Stochastic], (2, 2)),
    "digits_resnet18_w2a2_aux.yaml": ([AuxBranch], (2, 2)),
    "digits_resnet18_w1a1_cyclic.yaml": ([Cyclic], (1, 1)),
    "digits_resnet18_w1a2_aqe.yaml": ([Aqe], (1, 2)),
    "digits_resnet18_w4a4_guided.yaml": ([], (4, 4)),
    "digits_alexnet_w4a4_guided.yaml": ([], (4, 4)),
    "digits_w4a4_finetune.yaml": ([], (4, 4)),
    "digits_resnet18_w2a2_progressive_finetune.yaml": ([Progressive], (2, 2)),
    "digits_resnet18_w2a2_two_stage_finetune.yaml": ([TwoStage], (2, 2)),
    "digits_resnet18_w2a2_stochastic_finetune.yaml": ([Stochastic], (2, 2)),
    "digits_resnet18_w2a2_aux_finetune.yaml": ([AuxBranch], (2, 2)),
    "digits_resnet18_w1a1_cyclic_finetune.yaml": ([Cyclic], (1, 1)),
    "digits_resnet18_w1a2_aqe_finetune.yaml": ([Aqe], (1, 2)),
    "digits_resnet18_w4a4_guided_finetune.yaml": ([], (4, 4)),
    "digits_resnet18_w4a4_lsq_finetune.yaml": ([], (4, 4)),
    "digits_resnet18_w4a4_pact_finetune.yaml": ([], (4, 4)),
}
# The fine-tuning recipes start from runs/digits_fp, which a test machine need not have.
NO_PRETRAINED = ("model.pretrained=null",)
NO_GUIDE_PRETRAINED = ("guided.guide_pretrained=null",)


def without_pretrained(name: str) -> tuple[str, ...]:
    if not name.endswith("_finetune.yaml"):
        return ()
    return NO_PRETRAINED + (NO_GUIDE_PRETRAINED if "guided" in name else ())


def test_every_shipped_recipe_builds_its_policies_and_ends_at_its_target_bits():
    assert set(RECIPES) == {p.name for p in CONFIGS.glob("digits_*.yaml")}
    for name, (policies, last_bits) in RECIPES.items():
        cfg = load_config(CONFIGS / name) if "alexnet" in name else make_cfg(name, *without_pretrained(name))  # AlexNet has no width option
        ctl = make_controller(cfg)
        assert [type(p) for p in ctl.policies] == policies, name
        last = cfg.train.epochs * SPE - 1
        assert bits_at(ctl, last) == last_bits, name
        assert next(iter(ctl.bits_at(last).values())) == last_bits, name
