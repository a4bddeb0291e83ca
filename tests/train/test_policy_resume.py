"""Every precision policy survives a kill: a run killed mid-epoch, right after a checkpoint is
committed, and resumed ends bitwise equal to the uninterrupted run (weights, optimizer state,
controller, history, results), on one process and on two (DeepSpeed).

Each run is tiny: a width-4 ResNet-18 on 32 images, 4 steps per epoch, 4 epochs, a checkpoint
every 2 steps; the kill comes after the step-6 checkpoint (1.5 epochs), inside each policy's
schedule: before the two-stage switch, the aux branch's removal and LSQ's 4 -> 2 bit change (all at
step 8), in the low-precision phase of cyclic training's first bit depth, during AQE's alpha ramp.
"""

from __future__ import annotations

import json

import pytest
import torch

from distq.train.trainer import MEASURED_KEYS

EPOCHS, STEPS_PER_EPOCH, KILLED_AT = 4, 4, 6
POLICIES = {
    "guided": ("digits_resnet18_w4a4_guided.yaml", ()),
    "aqe": ("digits_resnet18_w1a2_aqe.yaml", ()),
    "aux": ("digits_resnet18_w2a2_aux.yaml", ()),
    "two_stage": ("digits_resnet18_w2a2_two_stage.yaml", ()),
    # 2 -> 1 weight bits, one cycle of 1 epoch full precision + 1 epoch low precision at each.
    "cyclic": ("digits_resnet18_w1a1_cyclic.yaml", ("precision.cyclic={start_bits: 2, cycles: 1, fp_length: 1ep, lp_length: 1ep}",)),
    # LSQ's learned steps (set from the first batch) under a bit-width change at step 8, and an LSQ
    # student beside a DoReFa one in a guided team.
    "lsq_progressive": ("digits_resnet18_w2a2_progressive.yaml", ("quant.method=lsq", "precision.progressive={w_bits: [4, 2], a_bits: [4, 2], stages: [2ep]}")),
    "lsq_guided": ("digits_resnet18_w4a4_guided.yaml", ("guided.students=[{w_bits: 4, a_bits: 4, method: lsq}, {w_bits: 2, a_bits: 2}]",)),
}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory, make_image_folder):
    return make_image_folder(tmp_path_factory.mktemp("resume-data"), classes=("a", "b", "c", "d"), per_class=8, size=(32, 32))


def train_args(tiny_args, run_dir, policy: str, root, processes: int) -> list[str]:
    config, extra = POLICIES[policy]
    return tiny_args(
        run_dir, f"data.root={root}", f"data.batch_size={8 // processes}", f"train.epochs={EPOCHS}", "run.save_every_steps=2",
        "log.tensorboard=false", "seed=4", *extra, config=config,
    )


def results_without_timings(run_dir) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    return {k: v for k, v in results.items() if k not in MEASURED_KEYS}


def assert_resumed_equals_reference(killed_dir, reference_dir, stopped, log_text, checkpoint_of, same_state):
    """``stopped``: the killed run's newest checkpoint before the resume."""
    assert f"resumed from {killed_dir / 'checkpoints' / f'step_{KILLED_AT:08d}'} at epoch 1, step {KILLED_AT} (2 of 4 steps into epoch 2)" in log_text
    want, got = checkpoint_of(reference_dir), checkpoint_of(killed_dir)
    assert (got["epoch"], got["step"]) == (want["epoch"], want["step"]) == (EPOCHS, EPOCHS * STEPS_PER_EPOCH)
    same_state(got["models"], want["models"], "models")
    same_state(got["optimizer"], want["optimizer"], "optimizer")
    assert got["controller"] == want["controller"] and got["history"] == want["history"]
    assert results_without_timings(killed_dir) == results_without_timings(reference_dir)
    # The resumed run trained on: its final weights are not the ones it started from.
    first = next(iter(want["models"]))
    assert not torch.equal(stopped["models"][first]["layer1.0.conv1.weight"], want["models"][first]["layer1.0.conv1.weight"])


# One process: guided (two models) and aux (branches with their own optimizer state, removed after
# the resume) by default, the others with -m slow (each test is three runs).
ONE_PROCESS = [p if p in ("guided", "aux", "lsq_progressive") else pytest.param(p, marks=pytest.mark.slow) for p in sorted(POLICIES)]


@pytest.mark.parametrize("policy", ONE_PROCESS)
def test_one_process_killed_and_resumed_equals_the_uninterrupted_run(policy, tmp_path, image_root, tiny_args, start_distq, run_distq, checkpoint_of, same_state):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = start_distq(*train_args(tiny_args, reference_dir, policy, image_root, 1), log=tmp_path / "reference.log")
    killed = run_distq(*train_args(tiny_args, killed_dir, policy, image_root, 1), env={"DISTQ_KILL_AT": f"after-commit@{KILLED_AT / STEPS_PER_EPOCH}"})
    assert killed.returncode != 0 and not (killed_dir / "results.json").exists(), killed.stderr
    stopped = checkpoint_of(killed_dir)
    assert stopped["step"] == KILLED_AT
    resumed = run_distq(*train_args(tiny_args, killed_dir, policy, image_root, 1), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()
    assert_resumed_equals_reference(killed_dir, reference_dir, stopped, resumed.stdout, checkpoint_of, same_state)


@pytest.mark.slow
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_two_processes_killed_and_resumed_equal_the_uninterrupted_run(policy, tmp_path, image_root, tiny_args, torchrun, checkpoint_of, same_state):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    log = tmp_path / "reference.log"
    assert torchrun(2, *train_args(tiny_args, reference_dir, policy, image_root, 2), log=log) == 0, log.read_text()[-3000:]
    kill = {"DISTQ_KILL_AT": f"after-commit@{KILLED_AT / STEPS_PER_EPOCH}"}
    assert torchrun(2, *train_args(tiny_args, killed_dir, policy, image_root, 2), log=tmp_path / "killed.log", env=kill) != 0
    stopped = checkpoint_of(killed_dir)
    assert stopped["step"] == KILLED_AT and not (killed_dir / "results.json").exists()
    log = tmp_path / "resumed.log"
    assert torchrun(2, *train_args(tiny_args, killed_dir, policy, image_root, 2), "--resume", "auto", log=log) == 0, log.read_text()[-3000:]
    assert_resumed_equals_reference(killed_dir, reference_dir, stopped, log.read_text(), checkpoint_of, same_state)
