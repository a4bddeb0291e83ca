"""A resumed run repeats what the uninterrupted run did: the controller rebuilt from a
checkpoint sets the same bits and samples the same stochastic-precision subsets, and a
PQ + SP run killed mid-stage and resumed ends bitwise equal to the uninterrupted run."""

from __future__ import annotations

import os
import signal

import torch

from distq.config import load_config
from distq.controller import Clock, Event, PrecisionController
from distq.models.build import build_model
from distq.models.team import Member
from distq.quant.layers import quant_layers

SPE, EPOCHS = 10, 6


def pq_sp_config():
    return load_config(
        None,
        ["seed=11", "model.width=4", "model.small_input=true", "quant.w_bits=2", "quant.a_bits=2", f"train.epochs={EPOCHS}",
         "precision.progressive={w_bits: [32, 4, 2], a_bits: [32, 8, 2], stages: [13ba, 2ep]}",
         "precision.stochastic={p0: 0.4, ramp: 0.8dur, unit: layer}"],
    )


def controller(cfg, model_seed: int) -> PrecisionController:
    torch.manual_seed(model_seed)
    model = build_model(cfg.model, cfg.quant, 10)
    return PrecisionController(cfg, Clock(SPE, SPE * EPOCHS), [Member("model", 2, 2, 0.1, model)])


def layer_state(ctl: PrecisionController, step: int) -> list[tuple[int, bool]]:
    ctl.on_event(Event.BATCH_START, step)
    return [(layer.bits, layer.quantize) for _, layer in quant_layers(ctl.students[0].model)]


def test_controller_from_a_checkpoint_repeats_the_uninterrupted_run(tmp_path):
    cfg = pq_sp_config()
    stop = 25  # mid-stage (stage 1 is steps 13..32) and mid-ramp (p < 1 until step 48)
    uninterrupted = controller(cfg, model_seed=0)
    before = {step: layer_state(uninterrupted, step) for step in range(stop)}
    torch.save({"model": uninterrupted.students[0].model.state_dict(), "controller": uninterrupted.state_dict()}, tmp_path / "ckpt.pt")
    after = {step: layer_state(uninterrupted, step) for step in range(stop, SPE * EPOCHS)}

    # A fresh process: other initial weights and RNG state until the checkpoint is loaded.
    torch.manual_seed(12345)
    resumed = controller(cfg, model_seed=1)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.students[0].model.load_state_dict(state["model"])
    resumed.load_state_dict(state["controller"])
    assert resumed.current == uninterrupted.precision_at(stop - 1)
    assert [layer.bits for _, layer in quant_layers(resumed.students[0].model)] == [bits for bits, _ in before[stop - 1]]
    torch.rand(99)
    assert {step: layer_state(resumed, step) for step in range(stop, SPE * EPOCHS)} == after

    # The steps compared cover a stage change, partial SP draws and the end of the ramp.
    assert {bits for state in after.values() for bits, _ in state} == {4, 8, 2}
    partial = [step for step, state in after.items() if not all(q for _, q in state)]
    assert len(partial) > 10 and min(partial) == stop and max(partial) < 48
    assert all(all(q for _, q in after[step]) for step in range(48, SPE * EPOCHS))


def test_pq_sp_run_killed_mid_stage_resumes_bitwise(tmp_path, make_image_folder, tiny_args, start_distq, run_distq, poll, checkpoint_of, steps_committed, same_state):
    # 96 images, batch 16: 6 steps per epoch, 24 in all. PQ stages: steps 0-3 at 32 bits,
    # 4-15 at 4 (weights) / 8 (activations), 16-23 at 2; SP ramps p from 0.3 to 1 over 18 steps.
    root = make_image_folder(tmp_path / "data", classes=("a", "b", "c", "d"), per_class=24, size=(32, 32))
    overrides = (
        f"data.root={root}", "data.batch_size=16", "train.epochs=4", "seed=3", "log.tensorboard=false",
        "precision.progressive={w_bits: [32, 4, 2], a_bits: [32, 8, 2], stages: [4ba, 2ep]}",
        "precision.stochastic={p0: 0.3, ramp: 0.75dur}",
    )
    config = "digits_resnet18_w2a2_progressive.yaml"
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = start_distq(*tiny_args(reference_dir, *overrides, config=config), log=tmp_path / "reference.log")
    victim = start_distq(*tiny_args(killed_dir, *overrides, config=config), log=tmp_path / "killed.log")

    assert poll(lambda: 12 in steps_committed(killed_dir) or victim.poll() is not None, timeout=300), "no checkpoint appeared"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    stopped = checkpoint_of(killed_dir)
    last = stopped["folder"]
    killed_at = stopped["epoch"]
    assert killed_at in (2, 3)  # 3 only if the kill lost a race with a whole epoch; both are mid-stage
    assert stopped["controller"]["precision"]["stage"] == (1 if killed_at == 2 else 2)
    assert stopped["controller"]["precision"]["sp_p"] < 1.0
    assert not (killed_dir / "results.json").exists()
    assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()

    resumed = run_distq(*tiny_args(killed_dir, *overrides, config=config), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {last} at epoch {killed_at}, step {killed_at * 6}" in resumed.stdout

    want = checkpoint_of(reference_dir)
    got = checkpoint_of(killed_dir)
    assert (got["epoch"], got["step"]) == (want["epoch"], want["step"]) == (4, 24)
    assert got["controller"] == want["controller"]
    assert got["controller"]["precision"]["stage"] == 2 and got["controller"]["precision"]["sp_p"] == 1.0
    assert got["history"] == want["history"] and len(got["history"]) == 4
    weights = want["models"]["model"]
    tensors = [k for k, v in weights.items() if isinstance(v, torch.Tensor)]
    assert len(tensors) > 50
    for name in tensors:
        assert torch.equal(got["models"]["model"][name], weights[name]), name
    assert got["models"]["model"].keys() == weights.keys()
    same_state(got["optimizer"], want["optimizer"], "optimizer")
    assert len(want["optimizer"]) == len(tensors) - len([k for k in tensors if "running" in k or "num_batches" in k])
    # The training actually moved the weights (a trivially equal pair proves nothing).
    assert not torch.equal(stopped["models"]["model"]["layer1.0.conv1.weight"], weights["layer1.0.conv1.weight"])
