"""Checkpoints survive any crash and any change of cluster size.

- a run killed at any moment (a random SIGKILL, or DISTQ_KILL_AT at each phase of a checkpoint
  write) and resumed ends bitwise equal to the uninterrupted run;
- a run resumed on another number of processes (2 -> 1 mid-epoch, 1 -> 2, 2 -> 3) completes and
  uses every training sample exactly once per epoch across the switch (the per-sample log);
- DALI, and the torchvision loader reading shards, resume mid-epoch bitwise too;
- damaged checkpoints are passed over in one line or refused in one line, never half-loaded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from distq.checkpoint import CheckpointError, load_state, save_tensors
from distq.checkpoint.manifest import FORMAT_VERSION, LATEST
from distq.train.sample_log import read_sample_log
from distq.train.trainer import MEASURED_KEYS

EPOCHS = 3
STEPS_PER_EPOCH = 4 * 24 // 16
DIGITS_TRAIN = 1442
# The digits at width 4 on 2 processes: 11 steps of 2 x 64 images per epoch.
TWO_PROCESSES = ("model.width=4", "data.batch_size=64", "data.workers=0", f"train.epochs={EPOCHS}", "log.progress=false",
                 "log.tensorboard=false", "dist.zero_stage=2", "log.samples=true")  # fmt: skip
DIGITS = "configs/digits_w4a4.yaml"


def results_without_timings(run_dir) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    for key in MEASURED_KEYS:
        results.pop(key, None)
    return results


def assert_same_training(got: dict, want: dict, same_state) -> None:
    """Same weights, optimizer state, controller and history, bit for bit; the weights moved."""
    assert (got["epoch"], got["step"]) == (want["epoch"], want["step"])
    tensors = [k for k, v in want["models"]["model"].items() if isinstance(v, torch.Tensor)]
    assert len(tensors) > 50
    same_state(got["models"], want["models"], "models")
    same_state(got["optimizer"], want["optimizer"], "optimizer")
    assert len(want["optimizer"]) > 50  # every parameter has its momentum
    assert got["controller"] == want["controller"] and got["history"] == want["history"]


def assert_each_sample_once_per_epoch(run_dir, global_batch: int, epochs: int = EPOCHS) -> None:
    used = read_sample_log(run_dir)
    assert sorted(used) == list(range(epochs))
    for epoch, indices in used.items():
        assert len(indices) == len(set(indices)) == (DIGITS_TRAIN // global_batch) * global_batch, epoch
        assert set(indices) <= set(range(DIGITS_TRAIN))


# --- one process, a SIGKILL at a random moment ---------------------------------------------


# Loader workers (2) are also in tests/mistakes/test_run_dir.py's SIGTERM test, which resumes bitwise too.
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_killed_run_resumes_bitwise(tmp_path, make_image_folder, tiny_args, start_distq, run_distq, poll, checkpoint_of, steps_committed, same_state, workers):
    # A small ImageNet-layout folder keeps three processes of three epochs to seconds.
    root = make_image_folder(tmp_path / "data", classes=("a", "b", "c", "d"), per_class=24, size=(32, 32))
    overrides = (f"data.root={root}", "data.batch_size=16", f"train.epochs={EPOCHS}", f"data.workers={workers}", "seed=5",
                 "quant.w_bits=2", "quant.a_bits=3", "log.tensorboard=false")  # fmt: skip
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    # Side by side, one core each. The reference also checks that --resume auto starts fresh
    # in an empty run dir.
    reference = start_distq(*tiny_args(reference_dir, *overrides), "--resume", "auto", log=tmp_path / "reference.log")
    victim = start_distq(*tiny_args(killed_dir, *overrides), log=tmp_path / "killed.log")

    assert poll(lambda: (killed_dir / "checkpoints" / LATEST).exists() or victim.poll() is not None, timeout=300), "no checkpoint appeared"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    killed_at = checkpoint_of(killed_dir)["epoch"]
    assert 1 <= killed_at < EPOCHS
    assert not (killed_dir / "results.json").exists()

    assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()
    assert "resumed from" not in (tmp_path / "reference.log").read_text()

    resumed = run_distq(*tiny_args(killed_dir, *overrides), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    tag = f"step_{killed_at * STEPS_PER_EPOCH:08d}"
    assert f"resumed from {killed_dir / 'checkpoints' / tag} at epoch {killed_at}, step {killed_at * STEPS_PER_EPOCH}\n" in resumed.stdout

    want, got = checkpoint_of(reference_dir), checkpoint_of(killed_dir)
    assert (got["epoch"], got["step"]) == (EPOCHS, EPOCHS * STEPS_PER_EPOCH)
    assert_same_training(got, want, same_state)
    assert results_without_timings(killed_dir) == results_without_timings(reference_dir)
    assert steps_committed(killed_dir) == [(EPOCHS - 1) * STEPS_PER_EPOCH, EPOCHS * STEPS_PER_EPOCH]  # run.keep_checkpoints=2


# --- two processes, DeepSpeed ZeRO-2: a kill at each phase of a checkpoint write ----------


@pytest.fixture(scope="module")
def zero2_reference(tmp_path_factory, torchrun, digits_root):
    """The uninterrupted 2-process run the killed ones must end equal to."""
    run_dir = tmp_path_factory.mktemp("zero2") / "reference"
    log = run_dir.parent / "reference.log"
    assert torchrun(2, "train", DIGITS, *TWO_PROCESSES, f"run.dir={run_dir}", log=log) == 0, log.read_text()[-3000:]
    return run_dir


# What each phase leaves of the epoch-2 checkpoint (step 22), and the step a resume starts from.
PHASES = {
    "mid-shards": ({"state.pt", "optim-00000-of-00002.pt"}, 11),
    "before-commit": ({"state.pt", "optim-00000-of-00002.pt", "optim-00001-of-00002.pt"}, 11),
    "after-commit": ({"state.pt", "optim-00000-of-00002.pt", "optim-00001-of-00002.pt", "manifest.json"}, 22),
}


@pytest.mark.parametrize(
    "phase", [pytest.param("mid-shards"), pytest.param("before-commit", marks=pytest.mark.slow), pytest.param("after-commit", marks=pytest.mark.slow)]
)
def test_kill_at_each_phase_of_a_checkpoint_resumes_bitwise(tmp_path, phase, zero2_reference, torchrun, checkpoint_of, steps_committed, same_state):
    run_dir, log = tmp_path / "run", tmp_path / "killed.log"
    args = ("train", DIGITS, *TWO_PROCESSES, f"run.dir={run_dir}", "run.keep_checkpoints=1")
    assert torchrun(2, *args, log=log, env={"DISTQ_KILL_AT": f"{phase}@2"}) != 0
    assert not (run_dir / "results.json").exists()
    files, resume_step = PHASES[phase]
    assert {p.name for p in (run_dir / "checkpoints" / "step_00000022").iterdir()} == files
    # Older checkpoints go only once the new one is committed: after the commit both are there.
    assert steps_committed(run_dir) == ([11, 22] if phase == "after-commit" else [11])

    resumed_log = tmp_path / "resumed.log"
    assert torchrun(2, *args, "--resume", "auto", log=resumed_log) == 0, resumed_log.read_text()[-3000:]
    text = resumed_log.read_text()
    passed_over = "checkpoint step_00000022 is incomplete (no manifest: its writing was interrupted): passed over"
    assert (passed_over in text) == (resume_step == 11), text[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{resume_step:08d}'} at epoch {resume_step // 11}, step {resume_step}\n" in text
    assert_same_training(checkpoint_of(run_dir), checkpoint_of(zero2_reference), same_state)
    assert results_without_timings(run_dir) == results_without_timings(zero2_reference)
    assert_each_sample_once_per_epoch(run_dir, global_batch=128)
    assert steps_committed(run_dir) == [33]  # run.keep_checkpoints=1


# --- another number of processes after the kill -------------------------------------------


SWITCHES = {
    # id: (processes before, after, extra overrides, kill spec, global batch, resume step, layout after)
    "2to1-mid-epoch": (2, 1, ("run.save_every_steps=4",), "after-commit@1.5", 128, 20, "64 images per process x 2 accumulation steps x 1 process"),
    "1to2": (1, 2, ("data.batch_size=128",), "after-commit@2", 128, 22, "64 images per process x 2 processes"),
    "2to3": (2, 3, ("data.batch_size=48",), "after-commit@2", 96, 30, "32 images per process x 3 processes"),
}


@pytest.mark.parametrize(
    "switch", [pytest.param("2to1-mid-epoch"), pytest.param("1to2", marks=pytest.mark.slow), pytest.param("2to3", marks=pytest.mark.slow)]
)
def test_resume_on_another_number_of_processes(tmp_path, switch, torchrun, checkpoint_of, digits_root):
    before, after, extra, kill, global_batch, resume_step, layout = SWITCHES[switch]
    run_dir = tmp_path / "run"
    args = ("train", DIGITS, *TWO_PROCESSES, *extra, f"run.dir={run_dir}")
    assert torchrun(before, *args, log=tmp_path / "killed.log", env={"DISTQ_KILL_AT": kill}) != 0
    resumed_log = tmp_path / "resumed.log"
    assert torchrun(after, *args, "--resume", "auto", log=resumed_log) == 0, resumed_log.read_text()[-3000:]
    text = resumed_log.read_text()
    steps = DIGITS_TRAIN // global_batch
    folder = run_dir / "checkpoints" / f"step_{resume_step:08d}"
    where = f"epoch {resume_step // steps}, step {resume_step}"
    if resume_step % steps:
        where += f" ({resume_step % steps} of {steps} steps into epoch {resume_step // steps + 1})"
    assert f"resumed from {folder} at {where}; written by {before} process(es), now {layout}, global batch {global_batch} kept\n" in text
    final = checkpoint_of(run_dir)
    assert (final["epoch"], final["step"], final["world_size"], final["global_batch"]) == (EPOCHS, EPOCHS * steps, after, global_batch)
    assert_each_sample_once_per_epoch(run_dir, global_batch)
    assert json.loads((run_dir / "results.json").read_text())["world_size"] == after


@pytest.mark.slow  # a minute; the world-size switches run by default
def test_a_resumed_run_keeps_its_global_batch_or_says_why_it_cannot(tmp_path, torchrun, run_distq, digits_root):
    run_dir = tmp_path / "run"
    args = ("train", DIGITS, *TWO_PROCESSES, "train.epochs=1", "train.warmup_epochs=0", "data.batch_size=50", f"run.dir={run_dir}")
    assert torchrun(2, *args, log=tmp_path / "first.log") == 0
    folder = run_dir / "checkpoints" / "step_00000014"
    changed = run_distq(*args, "train.epochs=2", "train.global_batch=64", "--resume", "auto")
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines() == [
        f"distq: error: checkpoint {folder} trained with a global batch of 100 and a resumed "
        "run keeps it: remove train.global_batch=64, or start a fresh run.dir to change it"
    ]
    log = tmp_path / "three.log"
    assert torchrun(3, *args, "train.epochs=2", "--resume", "auto", log=log) != 0
    assert (
        f"distq: error: checkpoint {folder} has a global batch of 100 images, which 3 processes cannot share evenly: "
        "run on 1, 2, 4, 5, 10, 20, 25, 50 or 100 processes"
    ) in log.read_text().splitlines()


# --- DALI, shards ----------------------------------------------------------------------------


@pytest.mark.parametrize("data", [pytest.param("dali", marks=pytest.mark.slow), "shards-torchvision"])
def test_run_killed_mid_epoch_resumes_bitwise(tmp_path, tiny_args, run_distq, checkpoint_of, same_state, digits_root, request, data):
    """DALI's reader, and the torchvision loader reading shards (``data.format=shards``), resume mid-epoch bitwise."""
    if data == "dali":
        pytest.importorskip("nvidia.dali")
        source = ("data.loader=dali",)
    else:
        source = ("data.format=shards", f"data.root={request.getfixturevalue('digits_shards')}")
    overrides = (*source, "train.epochs=2", "run.save_every_steps=3", "log.tensorboard=false", "seed=2")
    reference = run_distq(*tiny_args(tmp_path / "reference", *overrides))
    assert reference.returncode == 0, reference.stderr
    killed = run_distq(*tiny_args(tmp_path / "killed", *overrides), env={"DISTQ_KILL_AT": "after-commit@1.5"})
    assert killed.returncode == -signal.SIGKILL
    assert checkpoint_of(tmp_path / "killed")["step"] == 18  # 11 steps per epoch: step 18 is 7 steps into epoch 2
    resumed = run_distq(*tiny_args(tmp_path / "killed", *overrides), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "at epoch 1, step 18 (7 of 11 steps into epoch 2)" in resumed.stdout
    assert_same_training(checkpoint_of(tmp_path / "killed"), checkpoint_of(tmp_path / "reference"), same_state)


# --- damaged checkpoints through the command line ------------------------------------------


@pytest.fixture
def two_epoch_run(tmp_path, tiny_args, run_distq, digits_root):
    run_dir = tmp_path / "run"
    done = run_distq(*tiny_args(run_dir, "log.tensorboard=false"))
    assert done.returncode == 0, done.stderr
    return run_dir


def test_a_truncated_shard_falls_back_to_the_previous_checkpoint_in_one_line(two_epoch_run, tiny_args, run_distq, checkpoint_of):
    shard = two_epoch_run / "checkpoints" / "step_00000022" / "optim-00000-of-00001.pt"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:1000])
    done = run_distq(*tiny_args(two_epoch_run, "log.tensorboard=false", "train.epochs=3"), "--resume", "auto")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"checkpoint step_00000022 cannot be used: optim-00000-of-00001.pt has 1000 bytes, the manifest says {size} (truncated or overwritten): passed over"
    assert lines[1] == "config change on resume: train.epochs: 2 -> 3"
    assert lines[2] == f"resumed from {two_epoch_run / 'checkpoints' / 'step_00000011'} at epoch 1, step 11"
    assert checkpoint_of(two_epoch_run)["step"] == 33
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("damage", ["newer", "nothing-usable"])
def test_a_checkpoint_that_cannot_be_resumed_is_one_error_line(two_epoch_run, tiny_args, run_distq, damage):
    checkpoints = two_epoch_run / "checkpoints"
    if damage == "newer":
        for manifest in [checkpoints / LATEST, *checkpoints.glob("step_*/manifest.json")]:
            manifest.write_text(manifest.read_text().replace(f'"format": {FORMAT_VERSION}', f'"format": {FORMAT_VERSION + 1}'))
        want = f"has format {FORMAT_VERSION + 1}, newer than this distq's ({FORMAT_VERSION}): resume it with a newer distq"
    else:
        for state in checkpoints.glob("step_*/state.pt"):
            state.write_bytes(b"")
        want = "restore the files, or move the folder away to start afresh"
    done = run_distq(*tiny_args(two_epoch_run, "train.epochs=3"), "--resume", "auto")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("distq: error: ") and line.endswith(want)


# --- files --------------------------------------------------------------------------------


def tiny_state(value: float) -> dict:
    return {"config": {}, "classes": ["a"], "epoch": int(value), "models": {"model": {"w": torch.full((1000,), value)}}}


def test_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    save_tensors(tiny_state(1), path)

    def save_half_then_fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    from distq.checkpoint import files

    monkeypatch.setattr(files.torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_tensors(tiny_state(2), path)
    monkeypatch.undo()
    state = load_state(path)
    assert state["epoch"] == 1 and torch.equal(state["models"]["model"]["w"], torch.full((1000,), 1.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # no temporary file left


def test_a_file_survives_sigkill_during_writes(tmp_path, poll):
    """A process killed at a random moment of a stream of writes leaves a file that loads and
    is one complete state, not a mix of two."""
    writer = textwrap.dedent(
        f"""
        import torch
        from pathlib import Path
        from distq.checkpoint import save_tensors
        for i in range(1, 10_000):
            save_tensors({{"config": {{}}, "epoch": i, "models": {{"model": {{"w": torch.full((1 << 21,), float(i))}}}}}}, Path({str(tmp_path / "state.pt")!r}))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", writer], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert poll(lambda: (tmp_path / "state.pt").exists(), timeout=120)
        assert poll(lambda: load_state(tmp_path / "state.pt")["epoch"] >= 3, timeout=120)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    state = load_state(tmp_path / "state.pt")
    assert torch.equal(state["models"]["model"]["w"], torch.full((1 << 21,), float(state["epoch"])))


def damaged(data: bytes, how: str) -> bytes:
    return {
        "empty": b"",
        "random": bytes(range(256)) * 16,
        "text": b"epoch: 3\n",
        "first_half": data[: len(data) // 2],
        "no_tail": data[:-10],
        "flipped": data[:100] + bytes(b ^ 0xFF for b in data[100:300]) + data[300:],
    }[how]


@pytest.mark.parametrize("how", ["empty", "random", "text", "first_half", "no_tail", "flipped"])
def test_damaged_state_files_are_reported(tmp_path, how):
    good = tmp_path / "good.pt"
    save_tensors(tiny_state(1), good)
    bad = tmp_path / f"{how}.pt"
    bad.write_bytes(damaged(good.read_bytes(), how))
    with pytest.raises(CheckpointError, match=f"checkpoint '.*{how}.pt' is corrupt or not a distq checkpoint"):
        load_state(bad)


def test_a_float_state_dict_is_not_a_training_checkpoint(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match="is not a distq training checkpoint"):
        load_state(path)
    newer = tmp_path / "newer.pt"
    torch.save({**tiny_state(1), "format": FORMAT_VERSION + 1}, newer)
    with pytest.raises(CheckpointError, match="newer than this distq"):
        load_state(newer)
    with pytest.raises(CheckpointError, match="not found: pass a run directory"):
        load_state(tmp_path / "nothing.pt")
