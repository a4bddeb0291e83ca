"""slurm/train.sbatch and slurm/sweep.sbatch on a real one-node SLURM cluster (started by
tests/slurm/start_cluster.sh, which installs slurm-wlm and munge with apt-get if needed).

- a 2-process CPU job (one torchrun task, world size 2) trains to completion;
- SIGUSR1 to a running job (scancel --signal=USR1 [--full]): distq checkpoints mid-run, the job
  requeues itself, resumes with --resume auto and ends with the uninterrupted job's results
  and weights, bit for bit;
- a job array trains one config per index.

Jobs run one after another (the node has 2 CPUs), so the file takes minutes: slow + slurm.
There is no slurmdbd (no sacct): job states come from `scontrol show job` (finished jobs stay
for MinJobAge=600 s) and from the exit file train.sbatch writes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distq.checkpoint import load_state as load_checkpoint
from distq.train.trainer import MEASURED_KEYS

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(1800)]

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
# 3 epochs of 11 steps (2 ranks x 64 images per step): long enough to signal in epoch 2.
TINY = ["model.width=4", "data.batch_size=64", "data.workers=0", "train.epochs=3", "log.progress=false", "log.tensorboard=false"]


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory):
    """Environment (SLURM_CONF) of a one-node cluster up for the session; skips if SLURM cannot be had."""
    state = tmp_path_factory.mktemp("slurm-cluster")
    started = subprocess.run(["bash", HERE / "start_cluster.sh", state], capture_output=True, text=True, timeout=900)
    if started.returncode == 77:
        pytest.skip(f"no SLURM cluster on this machine: {started.stderr.strip() or 'start_cluster.sh exited 77'}")
    assert started.returncode == 0, started.stdout + started.stderr
    yield {"SLURM_CONF": str(state / "slurm.conf")}
    subprocess.run(["bash", HERE / "stop_cluster.sh", state], timeout=60)


class Job:
    """One sbatch submission of a slurm/ script, its log and exit file under ``folder``."""

    def __init__(self, slurm_env: dict, folder: Path, script: str, env: dict[str, str], *sbatch_args: str):
        self.slurm_env, self.folder = slurm_env, folder
        folder.mkdir(parents=True, exist_ok=True)
        self.log, self.exit_file = folder / "slurm.log", folder / "exit"
        job_env = {**os.environ, **slurm_env, "PYTHON": sys.executable, "DISTQ_EXIT_FILE": str(self.exit_file), **env}
        submitted = subprocess.run(
            ["sbatch", "--parsable", f"--output={self.log}", *sbatch_args, script],
            cwd=REPO_ROOT, env=job_env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        self.id = submitted.stdout.strip().split(";")[0]

    def command(self, *args: str) -> subprocess.CompletedProcess:
        """A SLURM command (scontrol, scancel, ...) talking to the test cluster."""
        return subprocess.run(args, env={**os.environ, **self.slurm_env}, capture_output=True, text=True, timeout=60)

    def info(self, job_id: str | None = None) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
        shown = self.command("scontrol", "show", "job", "-o", job_id or self.id)
        assert shown.returncode == 0, shown.stderr
        return dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)

    def wait(self, timeout: float, job_id: str | None = None) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (info := self.info(job_id))["JobState"] not in ENDED:
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id or self.id} still {info['JobState']} after {timeout:.0f} s; log:\n{self.tail()}")
            time.sleep(1)
        return info

    def exits(self) -> list[str]:
        return self.exit_file.read_text().splitlines() if self.exit_file.exists() else []

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text()[-chars:] if self.log.exists() else "(no log)"


def train_job(slurm_env, folder: Path, distq_cache: Path) -> Job:
    """slurm/train.sbatch in CPU mode: one node, one torchrun task starting 2 processes."""
    env = {
        "DISTQ_CACHE": str(distq_cache),
        "DISTQ_CONFIG": "configs/digits_w4a4.yaml",
        "DISTQ_OVERRIDES": " ".join([*TINY, f"run.dir={folder / 'run'}"]),
        "CPU_PROCS_PER_NODE": "2",
    }
    return Job(slurm_env, folder, "slurm/train.sbatch", env, "--cpus-per-task=2", "--job-name=distq-test")


@pytest.fixture(scope="module")
def uninterrupted(slurm_env, tmp_path_factory, digits_root, distq_cache):
    """The reference: the tiny config trained by one sbatch job, never signalled."""
    job = train_job(slurm_env, tmp_path_factory.mktemp("uninterrupted"), distq_cache)
    return job, job.wait(timeout=600)


def test_sbatch_trains_with_two_processes(uninterrupted):
    job, info = uninterrupted
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), job.tail()
    assert job.exits() == ["restart=0 exit=0"]
    assert "node 0/1 on " in job.log.read_text() and ": 2 processes (torchrun)" in job.log.read_text()
    results = json.loads((job.folder / "run" / "results.json").read_text())
    assert (results["world_size"], results["epochs"], results["steps"]) == (2, 3, 33)


# "steps": what --signal=USR1@N does at the time limit (every process of the job step, not the
# batch shell); "full": the batch shell too, whose trap forwards it to the step once more.
@pytest.mark.parametrize("delivery", [["--signal=USR1"], ["--signal=USR1", "--full"]], ids=["steps", "full"])
def test_usr1_checkpoints_requeues_and_resumes_to_the_same_result(slurm_env, uninterrupted, tmp_path, distq_cache, delivery):
    reference, _ = uninterrupted
    job = train_job(slurm_env, tmp_path / "signalled", distq_cache)
    checkpoints = job.folder / "run" / "checkpoints"
    deadline = time.monotonic() + 600
    while not (checkpoints / "latest.json").exists():  # the first epoch's checkpoint: training is under way
        assert job.info()["JobState"] in {"PENDING", "CONFIGURING", "RUNNING"}, job.tail()
        assert time.monotonic() < deadline, job.tail()
        time.sleep(0.1)
    signalled = job.command("scancel", *delivery, job.id)
    assert signalled.returncode == 0, signalled.stderr

    deadline = time.monotonic() + 300
    while (info := job.info())["Restarts"] == "0":
        assert info["JobState"] not in ENDED, f"the job ended instead of requeueing itself:\n{job.tail()}"
        assert time.monotonic() < deadline, job.tail()
        time.sleep(0.5)
    assert job.exits() == ["restart=0 exit=3 requeued"]
    # Pending (Reason=BeginTime) for the credential lifetime, 30 s on the test cluster. (Forcing
    # StartTime=now fails the job: the node still refuses the revoked credential.)
    info = job.wait(timeout=600)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), job.tail()
    assert job.exits() == ["restart=0 exit=3 requeued", "restart=1 exit=0"]
    log = job.log.read_text()
    assert ("train.sbatch: SIGUSR1: asking the training processes to checkpoint" in log) == ("--full" in delivery)
    stopped = re.search(r"distq: stopped by signal at epoch (\d+), step (\d+) \((\d+) of 11 in the epoch\)", log)
    resumed = re.search(r"resumed from (\S+) at epoch (\d+), step (\d+) \((\d+) of 11 steps into epoch (\d+)\)", log)
    assert stopped and resumed, log[-4000:]
    # A mid-epoch checkpoint (the signal came in epoch 2 or 3) and a resume from exactly there.
    assert int(stopped[1]) in (2, 3) and 0 < int(stopped[3]) < 11
    assert resumed[1] == str(checkpoints / f"step_{int(stopped[2]):08d}")
    assert (int(resumed[3]), int(resumed[5])) == (int(stopped[2]), int(stopped[1]))

    want = json.loads((reference.folder / "run" / "results.json").read_text())
    got = json.loads((job.folder / "run" / "results.json").read_text())
    for results in (want, got):
        for key in MEASURED_KEYS:
            results.pop(key, None)
    assert got == want
    final = load_checkpoint(job.folder / "run")
    expected = load_checkpoint(reference.folder / "run")
    assert final["history"] == expected["history"]
    weights = {k: v for k, v in expected["models"]["model"].items() if isinstance(v, torch.Tensor)}
    assert len(weights) > 50
    for name, tensor in weights.items():
        assert torch.equal(final["models"]["model"][name], tensor), name


def test_sweep_array_trains_one_config_per_index(slurm_env, tmp_path, digits_root, distq_cache):
    listing = tmp_path / "sweep.txt"
    listing.write_text("# two runs\nconfigs/digits_w4a4.yaml\n\nconfigs/digits_fp.yaml seed=3\n")
    env = {
        "DISTQ_CACHE": str(distq_cache),
        "SWEEP_LIST": str(listing),
        "SWEEP_DIR": str(tmp_path / "runs"),
        "DISTQ_OVERRIDES": " ".join([*TINY, "train.epochs=1", "train.warmup_epochs=0"]),
        "CPU_PROCS_PER_NODE": "1",  # one process each: both tasks fit the 2 CPUs at once
    }
    job = Job(slurm_env, tmp_path, "slurm/sweep.sbatch", env, "--array=0-1", "--cpus-per-task=1")
    for index in (0, 1):
        info = job.wait(timeout=600, job_id=f"{job.id}_{index}")
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.tail()
    for name in ("00-digits_w4a4", "01-digits_fp"):
        results = json.loads((tmp_path / "runs" / name / "results.json").read_text())
        assert (results["world_size"], results["epochs"]) == (1, 1)
    assert "seed: 3" in (tmp_path / "runs" / "01-digits_fp" / "config.yaml").read_text()
    assert job.exits() == ["restart=0 exit=0"] * 2


def test_a_job_requeued_with_fewer_tasks_resumes_on_them(slurm_env, tmp_path, digits_root, distq_cache):
    """LAUNCHER=srun (one task per training process): the default digits job on 2 tasks gets
    SIGUSR1 after its epoch-7 checkpoint, requeues itself, is given 1 task while it waits, and
    finishes on 1 process with the same global batch, every sample once per epoch, >= 96%."""
    run_dir = tmp_path / "run"
    env = {
        "DISTQ_CACHE": str(distq_cache),
        "DISTQ_CONFIG": "configs/digits_w4a4.yaml",
        "DISTQ_OVERRIDES": f"data.batch_size=32 data.workers=0 log.progress=false log.samples=true run.dir={run_dir}",
        "LAUNCHER": "srun",
    }
    job = Job(slurm_env, tmp_path, "slurm/train.sbatch", env, "--ntasks=2", "--cpus-per-task=1", "--job-name=distq-srun")
    latest = run_dir / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 1200
    while not (latest.exists() and json.loads(latest.read_text())["meta"]["epoch"] >= 7):
        assert job.info()["JobState"] in {"PENDING", "CONFIGURING", "RUNNING"}, job.tail()
        assert time.monotonic() < deadline, job.tail()
        time.sleep(0.5)
    assert job.command("scancel", "--signal=USR1", job.id).returncode == 0
    deadline = time.monotonic() + 300
    while (info := job.info())["Restarts"] == "0":
        assert info["JobState"] not in ENDED, f"the job ended instead of requeueing itself:\n{job.tail()}"
        assert time.monotonic() < deadline, job.tail()
        time.sleep(0.5)
    updated = job.command("scontrol", "update", f"JobId={job.id}", "NumTasks=1", "NumCPUs=1")
    assert updated.returncode == 0, updated.stderr
    info = job.wait(timeout=1800)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), job.tail()
    log = job.log.read_text()
    assert "train.sbatch: srun starts 2 training process(es), one per task" in log
    assert "train.sbatch: srun starts 1 training process(es), one per task" in log
    assert "written by 2 process(es), now 32 images per process x 2 accumulation steps x 1 process, global batch 64 kept" in log
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["epochs"], results["world_size"]) == (15, 1)
    assert results["val/top1"] >= 96.0, results
    from distq.train.sample_log import read_sample_log

    for epoch, used in read_sample_log(run_dir).items():
        assert len(used) == len(set(used)) == 22 * 64, epoch
