"""A tiny training run leaves TensorBoard scalars, results.json and checkpoints behind."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distq.config import config_from_dict
from distq.config.schema import ModelConfig, QuantConfig
from distq.models.build import build_model
from distq.quant.layers import QAct, quant_layers

STEPS_PER_EPOCH = 1442 // 128  # digits train split, batch 128, drop_last
EPOCHS = 2


@pytest.fixture(scope="module")
def events(tiny_run):
    accumulator = EventAccumulator(str(tiny_run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def values(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_loss_accuracy_and_lr_scalars(tiny_run, events):
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/top1", "val/top5", "val/loss", "lr"} <= tags

    epoch_ends = [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    top1 = values(events, "val/top1")
    top5 = values(events, "val/top5")
    assert [s for s, _ in top1] == epoch_ends
    assert all(0 <= a <= b <= 100 for (_, a), (_, b) in zip(top1, top5))

    # train/loss every 5 steps and at the end of every epoch.
    loss_steps = [s for s, _ in values(events, "train/loss")]
    assert loss_steps == [5, 10, 11, 15, 20, 22]
    assert all(0 < v < 10 for _, v in values(events, "train/loss"))

    cfg = config_from_dict(yaml.safe_load((tiny_run / "config.yaml").read_text()))
    assert (cfg.train.lr, cfg.train.schedule, cfg.train.warmup_epochs, cfg.train.epochs) == (0.1, "cosine", 1.0, 2)
    # The lr logged at step s is the one the s-th optimizer step (0-based s - 1) used: warm-up to
    # 0.1 over the 11 steps of epoch 1, then a cosine over the 11 of epoch 2 (by hand, not lr_factor).
    cosine = lambda done: 0.05 * (1 + math.cos(math.pi * done / 11))  # noqa: E731
    expected = {5: 0.1 * 5 / 11, 10: 0.1 * 10 / 11, 11: 0.1, 15: cosine(3), 20: cosine(8), 22: cosine(10)}
    assert dict(values(events, "lr")) == pytest.approx(expected, rel=1e-6)


def test_bit_widths_are_one_table_written_when_they_change(tiny_run, events):
    """No scalar series per layer: the per-layer bit-widths are a text table (written at the first
    epoch end; the second epoch changes nothing, so there is no second one)."""
    tags = set(events.Tags()["scalars"])
    assert not any(t.startswith("bits") for t in tags), sorted(tags)
    assert len(tags) < 12, sorted(tags)
    (tag,) = [t for t in events.Tags()["tensors"] if t.startswith("bits/")]
    assert tag == "bits/model/text_summary"
    (entry,) = events.Tensors(tag)
    assert entry.step == STEPS_PER_EPOCH
    text = entry.tensor_proto.string_val[0].decode()
    model = build_model(ModelConfig(arch="resnet18", width=4, small_input=True), QuantConfig(w_bits=2, a_bits=3), 10)
    rows = {line for line in text.splitlines()[2:]}
    want = {f"| {name} | {'activation' if isinstance(layer, QAct) else 'weight'} | {3 if isinstance(layer, QAct) else 2} | dorefa |"
            for name, layer in quant_layers(model)}
    assert rows == want
    # The layers kept in full precision are not quantized layers and have no row.
    assert "| fc |" not in text and "| conv1 |" not in text and "| layer4.1.act_out |" not in text


def test_results_json_and_checkpoints(tiny_run, events):
    results = json.loads((tiny_run / "results.json").read_text())
    assert results["epochs"] == EPOCHS and results["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert results["val/top1"] == pytest.approx(values(events, "val/top1")[-1][1])
    assert results["val/top5"] == pytest.approx(values(events, "val/top5")[-1][1])
    assert 0 <= results["val/top1"] <= 100
    # Speed of the last epoch: 11 steps of 128 images in well under the run's wall time.
    speed = values(events, "perf/train_images_per_s")
    assert [s for s, _ in speed] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert results["train_images_per_s"] == pytest.approx(speed[-1][1], rel=1e-3)
    assert results["train_images_per_s"] > STEPS_PER_EPOCH * 128 * EPOCHS / results["wall_time_s"]
    assert "max_memory_gib" not in results  # CPU run: no GPU memory to report
    checkpoints = sorted(p.name for p in (tiny_run / "checkpoints").iterdir())
    assert checkpoints == ["latest.json", "step_00000011", "step_00000022"]  # run.keep_checkpoints=2 by default
    state = torch.load(tiny_run / "checkpoints" / "step_00000022" / "state.pt", map_location="cpu", weights_only=True)
    assert all("train_images_per_s" not in h for h in state["history"])
    assert (state["epoch"], state["step"]) == (EPOCHS, EPOCHS * STEPS_PER_EPOCH)
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    assert state["history"][-1]["val/top1"] == results["val/top1"]
    extra = state["models"]["model"]["layer1.0.conv1._extra_state"]
    assert extra["bits"] == 2 and extra["method"] == "dorefa"
    assert state["models"]["model"]["layer1.0.act_out._extra_state"]["bits"] == 3


def test_a_guided_run_opens_on_loss_and_accuracy_with_each_model_overlaid(tmp_path, run_distq, tiny_args):
    """Read with TensorBoard's own reader: no per-layer series at all (the full-precision guide has
    no bit-width table either), fewer scalar tags than the student has quantized layers, and each
    model's loss and accuracy under the same tags in its own folder, so they overlay."""
    run_dir = tmp_path / "guided"
    proc = run_distq(*tiny_args(run_dir, "train.epochs=1", "train.warmup_epochs=0", config="digits_resnet18_w4a4_guided.yaml"))
    assert proc.returncode == 0, proc.stderr
    root = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    root.Reload()
    tags = set(root.Tags()["scalars"])
    student_layers = sum(1 for _ in quant_layers(build_model(ModelConfig(arch="resnet18", width=4), QuantConfig(w_bits=4, a_bits=4), 10)))
    assert len(tags) < student_layers and {"train/loss", "val/top1", "lr"} <= tags, sorted(tags)
    assert [t for t in root.Tags()["tensors"] if t.startswith("bits/")] == ["bits/student_w4a4/text_summary"]
    for model in ("guide", "student_w4a4"):
        per_model = EventAccumulator(str(run_dir / "tb" / model), size_guidance={"scalars": 0})
        per_model.Reload()
        assert {"train/loss", "val/top1", "val/top5", "val/loss"} == set(per_model.Tags()["scalars"]), model
