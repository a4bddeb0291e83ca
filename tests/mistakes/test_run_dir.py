"""A run directory that no everyday mistake can corrupt.

- a second job on a run directory is refused in one line naming the first, which finishes as if alone;
- training into a directory that holds a run needs --resume or --overwrite; --overwrite clears the old run;
- a resume with another bit-width (seed, learning rate, ...) is refused, listing each key; the keys
  that may change are applied with one line each, and the original config.yaml stays;
- a lock left by a SIGKILLed job, by an earlier run of the same SLURM job, or unrefreshed, is taken over;
- a run.dir that is a file, under a file or read-only, and a full disk, are one line each; after a
  full disk, --resume auto continues exactly;
- SIGTERM checkpoints mid-epoch like SIGUSR1; the resumed run ends with the uninterrupted run's weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from distq.errors import DistqError
from distq.train.run_dir import prepare
from distq.train.run_lock import LOCK, Holder, RunDirBusy, RunLock
from distq.train.trainer import MEASURED_KEYS


def tree_digest(run_dir: Path) -> dict[str, str]:
    """sha256 of every file below ``run_dir`` (TensorBoard events included), by relative path."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def results_without_timings(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    return {k: v for k, v in results.items() if k not in MEASURED_KEYS}


@pytest.fixture
def finished_run(tiny_run, tmp_path) -> Path:
    """A private copy of the session's finished tiny W2A3 run (2 epochs, 22 steps)."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    return run_dir


UNINTERRUPTED = ("log.tensorboard=false", "seed=6")
"""The overrides of the runs below that must end as one run alone, uninterrupted."""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_args, run_distq, digits_root) -> Path:
    """The tiny run with UNINTERRUPTED, alone and never stopped: what the others must equal."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = run_distq(*tiny_args(run_dir, *UNINTERRUPTED))
    assert done.returncode == 0, done.stderr
    return run_dir


def tiny_w2a3(tiny_args, run_dir: Path, *extra: str) -> list[str]:
    """The tiny_run fixture's own command line."""
    return tiny_args(run_dir, "quant.w_bits=2", "quant.a_bits=3", "log.every_steps=5", *extra)


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distq: error: "), proc.stderr
    return lines[0]


# --- a directory that holds a run -------------------------------------------------------------


def test_training_into_a_run_without_resume_is_refused_and_changes_nothing(finished_run, tiny_args, run_distq):
    before = tree_digest(finished_run)
    proc = run_distq(*tiny_w2a3(tiny_args, finished_run, "seed=7"))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert f"run.dir {finished_run} holds a finished run (2 epochs, step 22" in line
    assert "--resume auto" in line and "--overwrite" in line
    assert tree_digest(finished_run) == before


def test_overwrite_clears_the_old_run_so_no_old_step_outranks_the_new(finished_run, tiny_args, run_distq, steps_committed):
    proc = run_distq(*tiny_w2a3(tiny_args, finished_run, "train.epochs=1", "train.warmup_epochs=0", "seed=7"), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(f"run.dir {finished_run}: --overwrite deleted the earlier run's checkpoints/, tb/")
    assert steps_committed(finished_run) == [11]  # the old run's step 22 is gone, not kept as "newer"
    assert json.loads((finished_run / "checkpoints" / "latest.json").read_text())["tag"] == "step_00000011"
    assert yaml.safe_load((finished_run / "config.yaml").read_text())["seed"] == 7
    assert json.loads((finished_run / "results.json").read_text())["steps"] == 11


def test_resume_with_another_bit_width_seed_or_learning_rate_is_refused(finished_run, tiny_args, run_distq):
    before = tree_digest(finished_run)
    proc = run_distq(*tiny_args(finished_run, "quant.w_bits=4", "quant.a_bits=3", "log.every_steps=5", "seed=3", "train.lr=0.05"), "--resume", "auto")
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "quant.w_bits: checkpoint 2, now 4" in line
    assert "seed: checkpoint 0, now 3" in line
    assert "train.lr: checkpoint 0.1, now 0.05" in line
    assert "quant.a_bits" not in line and "log.every_steps" not in line
    assert tree_digest(finished_run) == before


def test_resuming_a_finished_run_changes_nothing(finished_run, tiny_args, run_distq):
    before = tree_digest(finished_run)
    proc = run_distq(*tiny_w2a3(tiny_args, finished_run), "--resume", "auto")
    assert proc.returncode == 0, proc.stderr
    assert f"run.dir {finished_run} is finished (epoch 2 of train.epochs=2): nothing to train" in proc.stdout
    assert json.loads(proc.stdout.splitlines()[-1]) == json.loads((finished_run / "results.json").read_text())
    assert tree_digest(finished_run) == before  # results.json's wall time is not rewritten


def test_extending_a_run_says_each_change_and_keeps_the_original_config(finished_run, tiny_args, run_distq):
    original = (finished_run / "config.yaml").read_bytes()
    proc = run_distq(*tiny_w2a3(tiny_args, finished_run, "train.epochs=3", "log.every_steps=4"), "--resume", "auto")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "config change on resume: train.epochs: 2 -> 3" in lines
    assert "config change on resume: log.every_steps: 5 -> 4" in lines
    assert (finished_run / "config.yaml").read_bytes() == original
    assert yaml.safe_load((finished_run / "config.resume-1.yaml").read_text())["train"]["epochs"] == 3
    results = json.loads((finished_run / "results.json").read_text())
    assert results["epochs"] == 3 and results["wall_time_s"] > 0


# --- one owner ------------------------------------------------------------------------------


def test_a_second_job_on_the_same_run_dir_exits_2_naming_the_first(tmp_path, tiny_args, start_distq, run_distq, poll, uninterrupted):
    shared = tmp_path / "shared"
    args = UNINTERRUPTED
    first = start_distq(*tiny_args(shared, *args), log=tmp_path / "first.log")
    assert poll(lambda: (shared / LOCK).exists() or first.poll() is not None, timeout=120)
    time.sleep(1)
    second = run_distq(*tiny_args(shared, *args, "seed=5"))
    assert second.returncode == 2
    line = one_error_line(second)
    assert f"run.dir {shared} is in use by pid {first.pid} on {socket.gethostname()}" in line
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()
    assert results_without_timings(shared) == results_without_timings(uninterrupted)
    assert yaml.safe_load((shared / "config.yaml").read_text())["seed"] == 6
    assert not (shared / LOCK).exists()  # given back at the end


@pytest.mark.slow
def test_a_second_two_process_job_exits_2_naming_the_first(tmp_path, torchrun, poll):
    """The same on 2 processes each (torchrun): every rank of the second job stops; rank 0 says why."""
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    # Long enough (8 epochs) that the second job, starting its processes, finds the first still running.
    args = ("train", "configs/digits_w4a4.yaml", "model.width=4", "data.batch_size=64", "data.workers=0", "train.epochs=8",
            "log.progress=false", "log.tensorboard=false")  # fmt: skip
    first = torchrun(2, *args, f"run.dir={shared}", log=tmp_path / "first.log", wait=False)
    assert poll(lambda: (shared / LOCK).exists() or first.poll() is not None, timeout=300)
    time.sleep(1)
    assert torchrun(2, *args, f"run.dir={shared}", log=tmp_path / "second.log") != 0
    second = (tmp_path / "second.log").read_text()
    refusals = [line for line in second.splitlines() if line.startswith("distq: error: ")]
    assert len(refusals) == 1 and f"run.dir {shared} is in use by pid" in refusals[0], second
    assert "exitcode  : 2" in second
    assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert torchrun(2, *args, f"run.dir={alone}", log=tmp_path / "alone.log") == 0
    assert results_without_timings(shared) == results_without_timings(alone)


def test_a_lock_left_by_a_sigkilled_run_is_taken_over_by_resume(tmp_path, tiny_args, start_distq, run_distq, poll):
    run_dir = tmp_path / "run"
    victim = start_distq(*tiny_args(run_dir, "log.tensorboard=false"), log=tmp_path / "victim.log")
    assert poll(lambda: (run_dir / "checkpoints" / "latest.json").exists() or victim.poll() is not None, timeout=120)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert json.loads((run_dir / LOCK).read_text())["pid"] == victim.pid
    resumed = run_distq(*tiny_args(run_dir, "log.tensorboard=false"), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    first = resumed.stdout.splitlines()[0]
    assert first.startswith(f"run.dir {run_dir}: took over the lock of pid {victim.pid} on {socket.gethostname()}, started ")
    assert first.endswith(f": its process {victim.pid} is gone")
    assert "resumed from" in resumed.stdout and not (run_dir / LOCK).exists()


def _foreign_lock(run_dir: Path, age_s: float, **fields) -> Holder:
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = Holder(**{"host": "node-17", "pid": 4242, "started": "2026-12-01 10:00:00 UTC", "token": "f" * 32, **fields})
    (run_dir / LOCK).write_text(json.dumps(holder.__dict__))
    stamp = time.time() - age_s
    os.utime(run_dir / LOCK, (stamp, stamp))
    return holder


def test_a_lock_of_another_node_is_respected_until_it_goes_stale(tmp_path):
    _foreign_lock(tmp_path, age_s=5, slurm_job="9001")
    lock = RunLock(tmp_path, stale_s=60)
    with pytest.raises(RunDirBusy, match=r"is in use by pid 4242 on node-17, SLURM job 9001, started 2026-12-01 10:00:00 UTC .*refreshed 5 s ago"):
        lock.acquire()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "f" * 32  # untouched

    _foreign_lock(tmp_path, age_s=120)
    lock.acquire()
    try:
        assert lock.notes == [f"run.dir {tmp_path}: took over the lock of pid 4242 on node-17, started 2026-12-01 10:00:00 UTC: not refreshed for 120 s (run.lock_stale_s=60)"]
        assert json.loads((tmp_path / LOCK).read_text())["token"] == lock.me.token
    finally:
        lock.release()
    assert not (tmp_path / LOCK).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no private or abandoned lock files left


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "9001")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _foreign_lock(tmp_path, age_s=1, slurm_job="9001", slurm_restart="0")
    lock = RunLock(tmp_path, stale_s=600)
    lock.acquire()
    lock.release()
    assert lock.notes[0].endswith("it is this SLURM job's own, from before its requeue (restart 0)")
    # Another job step of the same allocation (same job, same restart count) is refused.
    _foreign_lock(tmp_path, age_s=1, slurm_job="9001", slurm_restart="1")
    with pytest.raises(RunDirBusy):
        RunLock(tmp_path, stale_s=600).acquire()


def test_the_owner_refreshes_its_lock_and_notices_a_takeover(tmp_path):
    lock = RunLock(tmp_path, stale_s=0.5)
    lock.acquire()
    try:
        stamp = time.time() - 100
        os.utime(tmp_path / LOCK, (stamp, stamp))
        time.sleep(0.3)
        assert time.time() - (tmp_path / LOCK).stat().st_mtime < 1  # refreshed
        _foreign_lock(tmp_path, age_s=0)  # taken over while this job was paused
        time.sleep(0.3)
        with pytest.raises(RunDirBusy, match="was taken over by pid 4242 on node-17"):
            lock.check()
    finally:
        lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == 4242  # the new owner's lock is left alone


# --- run.dir that cannot be used, a full disk ---------------------------------------------------


def test_a_run_dir_that_is_a_file_or_under_a_file_is_one_line(tmp_path, tiny_args, run_distq):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    proc = run_distq(*tiny_args(afile))
    assert proc.returncode == 2 and one_error_line(proc) == f"distq: error: run.dir {afile} is a file, not a folder: choose another run.dir"
    with pytest.raises(DistqError) as under:
        prepare(afile / "run")
    assert str(under.value) == f"run.dir {afile / 'run'} cannot be created: {afile} is a file, not a folder; choose another run.dir"
    assert afile.read_text() == "not a folder"


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size)``: a tmpfs of ``size`` mounted under tmp_path (root only), unmounted afterwards."""
    mounts = []

    def mount(size: str, options: str = "") -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_read_only_run_dir_is_one_line(small_disk, tiny_args, run_distq):
    disk = small_disk("1M", ",ro")
    proc = run_distq(*tiny_args(disk / "run"))
    assert proc.returncode == 2
    assert one_error_line(proc) == f"distq: error: run.dir {disk / 'run'} is on a read-only file system: choose a writable run.dir"


def test_a_full_disk_during_a_checkpoint_loses_nothing_and_resumes_exactly(tmp_path, small_disk, tiny_args, run_distq, checkpoint_of, same_state, uninterrupted):
    args = UNINTERRUPTED
    checkpoint_bytes = sum(p.stat().st_size for p in (uninterrupted / "checkpoints" / "step_00000022").iterdir())
    # Room for the epoch-1 checkpoint and the run's small files, not for a second checkpoint beside it.
    disk = small_disk(f"{int(checkpoint_bytes * 1.6) // 4096 * 4096}")
    run_dir = disk / "run"
    full = run_distq(*tiny_args(run_dir, *args))
    assert full.returncode == 2
    line = one_error_line(full)
    assert f"checkpoint {run_dir / 'checkpoints' / 'step_00000022'} could not be written (no space left on the device): nothing is lost" in line
    assert "--resume auto" in line
    assert checkpoint_of(run_dir)["step"] == 11  # the epoch-1 checkpoint is intact
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)  # "free the space": the run moves to a disk with room
    resumed = run_distq(*tiny_args(moved, *args), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    want, got = checkpoint_of(uninterrupted), checkpoint_of(moved)
    assert (got["epoch"], got["step"]) == (2, 22)
    same_state(got["models"], want["models"], "models")
    same_state(got["optimizer"], want["optimizer"], "optimizer")


# --- SIGTERM is a pre-emption ------------------------------------------------------------------


def test_sigterm_mid_epoch_checkpoints_and_the_resumed_run_ends_as_the_uninterrupted_one(tmp_path, tiny_args, start_distq, run_distq, poll, checkpoint_of, same_state, uninterrupted):
    # Loader workers too (they must not die of the signal) and a plain progress line every step.
    args = (*UNINTERRUPTED, "data.workers=2", "log.every_steps=1", "log.progress=true")
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    proc = start_distq(*tiny_args(run_dir, *args), log=log)
    assert poll(lambda: "epoch 2/2: 2/11 steps" in log.read_text() or proc.poll() is not None, timeout=300), log.read_text()
    # As SLURM pre-empts: SIGTERM to every process of the job (the loader's workers too).
    for pid in [proc.pid, *_children(proc.pid)]:
        os.kill(pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 3, log.read_text()
    stopped = checkpoint_of(run_dir)["step"]
    assert 11 + 2 <= stopped < 22, log.read_text()
    assert "checkpoint saved, resume with --resume auto" in log.read_text()
    resumed = run_distq(*tiny_args(run_dir, *args), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    want, got = checkpoint_of(uninterrupted), checkpoint_of(run_dir)
    assert (got["epoch"], got["step"]) == (want["epoch"], want["step"]) == (2, 22)
    same_state(got["models"], want["models"], "models")
    same_state(got["optimizer"], want["optimizer"], "optimizer")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]
