"""``distq plan --every-step`` is what training does: for every shipped digits recipe, a short run
records, at each optimizer step, the bits (and AQE alpha, aux factor) its students' layers
actually have, and they equal the plan's row for that step. The run also shows that the loop
fires every event of ``Event``'s pseudocode, in order."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch

from distq.cli import main
from distq.config import load_config
from distq.controller import Event
from distq.quant.functional import FULL_PRECISION
from distq.quant.layers import QAct, quant_layers
from distq.train.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(p.name for p in CONFIGS.glob("digits_*.yaml"))
HEAVY = {"digits_alexnet_w4a4_guided.yaml"}  # two 57M-parameter AlexNets: minutes on a CPU
TRAIN_IMAGES, BATCH = 16, 8
STEPS_PER_EPOCH = TRAIN_IMAGES // BATCH


@pytest.fixture(scope="module")
def image_root(tmp_path_factory, make_image_folder):
    return make_image_folder(tmp_path_factory.mktemp("plan-data"), classes=("a", "b", "c", "d"), per_class=4, size=(32, 32))


def overrides(name: str, root: Path, run_dir: Path) -> list[str]:
    width = [] if "alexnet" in name else ["model.width=4"]
    # The fine-tuning recipes start from runs/digits_fp; the plan does not depend on the weights.
    if name.endswith("_finetune.yaml"):
        width += ["model.pretrained=null"] + (["guided.guide_pretrained=null"] if "guided" in name else [])
    return [*width, f"data.root={root}", f"data.batch_size={BATCH}", "data.workers=0", "log.progress=false",
            "log.tensorboard=false", f"run.dir={run_dir}"]


def plan_rows(config: Path, extra: list[str]) -> list[dict]:
    """``distq plan --every-step``'s table, one dict per step."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", str(config), *extra, "--every-step"]) == 0
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["step", "epoch"])
    header = lines[start].split()
    students = [header[i - 1] for i, word in enumerate(header) if word == "w/a"]
    rows = []
    for line in lines[start + 1:]:
        cells = line.split()
        bits = dict(zip(students, cells[4:4 + len(students)]))
        p, f, alpha, _ = cells[4 + len(students):]
        rows.append({"step": int(cells[0]), "bits": bits, "f": f, "alpha": alpha})
    return rows


def bit_text(bits: set[int]) -> str:
    assert len(bits) == 1, bits  # every quantized layer of a kind at the same bit-width
    value = bits.pop()
    return "fp" if value == FULL_PRECISION else str(value)


def train_and_record(cfg) -> tuple[list[dict], list[Event]]:
    """Train ``cfg``; at each optimizer step, what the layers hold when the forward pass runs."""
    torch.set_num_threads(1)
    trainer = Trainer(cfg)
    controller = trainer.controller
    applied, events = [], []
    train_step, on_event = trainer.train_step, controller.on_event

    def recording_step(images, labels, boundary=True):
        row = {"step": trainer.step, "bits": {}, "alpha": set(), "f": set()}
        for student in controller.students:
            layers = [layer for _, layer in quant_layers(student.model)]
            w = bit_text({layer.bits for layer in layers if not isinstance(layer, QAct)})
            a = bit_text({layer.bits for layer in layers if isinstance(layer, QAct)})
            row["bits"][student.name] = f"{w}/{a}"
            row["alpha"] |= {f"{layer.alpha:.3f}" for layer in layers}
            if controller.aux:
                row["f"].add(f"{controller.aux[student.name].factor:.3f}")
        applied.append(row)
        return train_step(images, labels, boundary)

    def recording_event(event, step):
        events.append(event)
        on_event(event, step)

    trainer.train_step = recording_step
    controller.on_event = recording_event
    trainer.fit()
    return applied, events


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in RECIPES])
def test_the_plan_is_what_training_applies_at_every_step(name, image_root, tmp_path):
    extra = overrides(name, image_root, tmp_path / "run")
    cfg = load_config(CONFIGS / name, extra)
    planned = plan_rows(CONFIGS / name, extra)
    applied, events = train_and_record(cfg)

    steps = cfg.train.epochs * STEPS_PER_EPOCH
    assert [row["step"] for row in planned] == [row["step"] for row in applied] == list(range(steps))
    for plan, seen in zip(planned, applied):
        assert plan["bits"] == seen["bits"], plan["step"]
        if plan["alpha"] != "-":  # without an AQE schedule the layers keep their own alpha
            assert seen["alpha"] == {plan["alpha"]}, plan["step"]
        if plan["f"] != "-":
            assert seen["f"] == {plan["f"]}, plan["step"]
    per_epoch = [Event.EPOCH_START] + [Event.BATCH_START, Event.AFTER_STEP] * STEPS_PER_EPOCH + [Event.EPOCH_END]
    assert events == [Event.FIT_START] + per_epoch * cfg.train.epochs + [Event.FIT_END]
