"""A rank that dies mid-run fails the whole job, non-zero and within dist.timeout_s (plus start-up
slack), instead of leaving the other ranks hanging in a collective.

Two ways a rank dies: under torchrun (its agent sees the dead worker and stops the others), and
with no launcher watching (one process per "node", as when a whole remote node dies): there the
survivor's collective must fail by itself, by gloo noticing the closed connection or at the
latest after dist.timeout_s.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 30
MARGIN_S = 30  # teardown: the launcher's grace period, interpreter exit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(run_dir: Path) -> list[str]:
    # Many epochs: the run is still training when a rank is killed.
    return [
        "-m", "distq", "train", "configs/digits_w4a4.yaml",
        "model.width=4", "data.batch_size=64", "data.workers=0", "train.epochs=100",
        "log.progress=false", "log.tensorboard=false", f"run.dir={run_dir}",
        f"dist.timeout_s={TIMEOUT_S}",
    ]  # fmt: skip


def env_for(distq_cache: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "DISTQ_CACHE": str(distq_cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def start_ranks_without_launcher(tmp_path: Path, distq_cache: Path) -> tuple[list[subprocess.Popen], list]:
    """Ranks 0 and 1 as two plain processes (what two nodes' launchers would start), logs in tmp_path."""
    port = str(free_port())
    procs, logs = [], []
    for rank in (0, 1):
        logs.append(open(tmp_path / f"rank{rank}.log", "w"))
        env = env_for(distq_cache, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        command = [sys.executable, *train_args(tmp_path / "run")]
        procs.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
    return procs, logs


def wait_training(run_dir: Path, procs: list[subprocess.Popen], poll) -> None:
    """Until the first epoch's checkpoint exists: every rank is inside the training loop."""
    last = run_dir / "checkpoints" / "latest.json"
    assert poll(lambda: last.exists() or any(p.poll() is not None for p in procs), timeout=300, interval=0.2)
    assert all(p.poll() is None for p in procs), "a process ended before training started"


def assert_one_line_about_the_lost_peer(log: str) -> None:
    """The rank ends with distq's one line, not a collective's traceback or a gloo abort."""
    last = log.strip().splitlines()[-1]
    assert last.startswith("distq: error: rank 0 of 2 lost the other ranks ("), log[-3000:]
    assert last.endswith("resume with --resume auto") and "Traceback" not in log, log[-3000:]


def exit_within(proc: subprocess.Popen, seconds: float) -> tuple[int, float]:
    start = time.monotonic()
    try:
        code = proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {seconds:.0f} s after a rank died")
    return code, time.monotonic() - start


def kill_tree(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
    proc.wait()


@pytest.mark.slow  # over a minute; test_rank_without_launcher_fails_when_its_peer_dies runs by default
def test_torchrun_job_fails_when_a_worker_is_killed(tmp_path, digits_root, distq_cache, poll):
    log = open(tmp_path / "torchrun.log", "w")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", *train_args(tmp_path / "run")],
        cwd=REPO_ROOT, env=env_for(distq_cache), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_training(tmp_path / "run", [launcher], poll)
        workers = [p for p in psutil.Process(launcher.pid).children() if "distq" in p.cmdline()]
        ranks = {int(p.environ()["RANK"]): p for p in workers}
        assert sorted(ranks) == [0, 1]
        ranks[1].send_signal(signal.SIGKILL)
        code, took = exit_within(launcher, TIMEOUT_S + MARGIN_S)
        assert code != 0, (tmp_path / "torchrun.log").read_text()[-3000:]
        assert not ranks[0].is_running() or ranks[0].status() == psutil.STATUS_ZOMBIE, "rank 0 outlived the job"
        print(f"torchrun exited {code} {took:.1f} s after rank 1 was killed")
    finally:
        kill_tree(launcher)
        log.close()


def test_rank_without_launcher_fails_when_its_peer_dies(tmp_path, digits_root, distq_cache, poll):
    """No agent watches the ranks: rank 0 must notice by itself that rank 1 is gone."""
    procs, logs = start_ranks_without_launcher(tmp_path, distq_cache)
    try:
        wait_training(tmp_path / "run", procs, poll)
        procs[1].kill()
        procs[1].wait()
        code, took = exit_within(procs[0], TIMEOUT_S + MARGIN_S)
        log = (tmp_path / "rank0.log").read_text()
        assert code == 1, log[-3000:]
        assert_one_line_about_the_lost_peer(log)
        print(f"rank 0 exited {code} {took:.1f} s after rank 1 was killed")
    finally:
        for proc in procs:
            kill_tree(proc)
        for log in logs:
            log.close()


@pytest.mark.slow
def test_frozen_rank_fails_the_job_after_the_collective_timeout(tmp_path, digits_root, distq_cache, poll):
    """A rank that hangs (SIGSTOP: connections stay open, nothing arrives) is only caught by the
    collective timeout: rank 0 fails after about dist.timeout_s, not before, not much after."""
    procs, logs = start_ranks_without_launcher(tmp_path, distq_cache)
    try:
        wait_training(tmp_path / "run", procs, poll)
        procs[1].send_signal(signal.SIGSTOP)
        code, took = exit_within(procs[0], TIMEOUT_S + MARGIN_S)
        log = (tmp_path / "rank0.log").read_text()
        assert code == 1, log[-3000:]
        assert_one_line_about_the_lost_peer(log)
        assert "Timed out" in log.splitlines()[-1]
        assert took >= TIMEOUT_S - 5, f"rank 0 failed {took:.0f} s after rank 1 froze, before the {TIMEOUT_S} s timeout"
        print(f"rank 0 exited {code} {took:.1f} s after rank 1 froze")
    finally:
        procs[1].send_signal(signal.SIGCONT)
        for proc in procs:
            kill_tree(proc)
        for log in logs:
            log.close()
