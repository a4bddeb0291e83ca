"""slurm/node.sh (one node's part of a SLURM job) without SLURM: the environment srun would give it.

SLURM signals every process of a job step, so the test sends SIGUSR1 to node.sh and all its
descendants (torchrun starts its workers in sessions of their own, so a process-group kill
would miss them): torchrun must survive it, distq must checkpoint, and node.sh must exit 3
(the status that makes slurm/train.sbatch requeue the job) although torchrun reports 1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from distq.checkpoint import load_state as load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_SH = REPO_ROOT / "slurm" / "node.sh"
LAUNCHER_MODULES = {"torch.distributed.run", "accelerate.commands.launch"}  # as node.sh runs them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(distq_cache: Path, run_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMP_NUM_THREADS", "GPUS_PER_NODE", "CPU_PROCS"))}
    env.update(
        DISTQ_CACHE=str(distq_cache),
        PYTHON=sys.executable,
        PYTHONUNBUFFERED="1",
        SLURM_NNODES="1",
        SLURM_NODEID="0",
        SLURM_CPUS_PER_TASK="2",
        DISTQ_MASTER_ADDR="127.0.0.1",
        DISTQ_MASTER_PORT=str(free_port()),
        DISTQ_CONFIG="configs/digits_w4a4.yaml",
        DISTQ_OVERRIDES=f"model.width=4 data.batch_size=64 data.workers=0 train.epochs=3 log.progress=false log.tensorboard=false run.dir={run_dir}",
    )
    env.update(extra)
    return env


@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("accelerate", marks=pytest.mark.slow)])
def test_usr1_to_the_whole_step_checkpoints_and_exits_3(tmp_path, digits_root, distq_cache, poll, launcher):
    run_dir = tmp_path / "run"
    with open(tmp_path / "node.log", "w") as log:
        node = subprocess.Popen(
            ["bash", NODE_SH], cwd=REPO_ROOT, env=node_env(distq_cache, run_dir, CPU_PROCS_PER_NODE="2", LAUNCHER=launcher),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        last = run_dir / "checkpoints" / "latest.json"
        assert poll(lambda: last.exists() or node.poll() is not None, timeout=300, interval=0.1)
        assert node.poll() is None, (tmp_path / "node.log").read_text()[-3000:]
        everyone = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
        starter = next(p for p in everyone if set(p.cmdline()) & LAUNCHER_MODULES)
        for process in everyone:  # what SLURM does (proctrack): every process of the step
            process.send_signal(signal.SIGUSR1)
        code = node.wait(timeout=120)
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
    text = (tmp_path / "node.log").read_text()
    assert code == 3, text[-3000:]
    assert text.count("distq: stopped by signal at epoch") >= 1, text[-3000:]
    assert f"node.sh: {launcher} exited 1; distq checkpointed" in text  # the launcher outlived USR1 (else 138)
    assert not starter.is_running()
    state = load_checkpoint(run_dir)
    assert state["step"] % 11 and state["world_size"] == 2  # the mid-epoch checkpoint of the signal
    assert json.loads(last.read_text())["tag"] == f"step_{state['step']:08d}"


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has GPUs")
def test_no_gpu_and_no_cpu_mode_is_a_clear_error(tmp_path, distq_cache):
    env = node_env(distq_cache, tmp_path / "run")
    done = subprocess.run(["bash", NODE_SH], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "set GPUS_PER_NODE, or CPU_PROCS_PER_NODE=N" in done.stderr


def test_unknown_launcher_is_a_clear_error(tmp_path, distq_cache):
    env = node_env(distq_cache, tmp_path / "run", CPU_PROCS_PER_NODE="1", LAUNCHER="mpirun")
    done = subprocess.run(["bash", NODE_SH], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "LAUNCHER=mpirun: use torchrun or accelerate" in done.stderr
