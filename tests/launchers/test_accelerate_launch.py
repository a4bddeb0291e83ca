"""launchers/: the accelerate config files and launchers/launch.sh.

- every config file loads as an accelerate config and says what its name says;
- launch.sh turns its env vars into accelerate launch options (checked with a stand-in
  `accelerate` that prints its arguments);
- two launch.sh "machines" on localhost (machine ranks 0 and 1, one process each) train
  together to completion, and report the accuracy of the model they saved;
- slow: the 2-process CPU config trains the guided W4A4 digits job to >= 96% top-1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCH_SH = REPO_ROOT / "launchers" / "launch.sh"
ACCELERATE = REPO_ROOT / "launchers" / "accelerate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(distq_cache: Path, **extra: str) -> dict[str, str]:
    """The test's interpreter first on PATH (its `accelerate`), one thread per process."""
    names = ("NUM_MACHINES", "NUM_PROCESSES", "MACHINE_RANK", "MAIN_PROCESS_IP", "MAIN_PROCESS_PORT", "ACCELERATE_ARGS")
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        DISTQ_CACHE=str(distq_cache),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def test_config_files_say_what_their_names_say():
    configs = {path.stem: load_config_from_file(str(path)) for path in sorted(ACCELERATE.glob("*.yaml"))}
    assert sorted(configs) == ["cpu_2proc", "multi_node", "single_node_gpus"]
    for config in configs.values():
        # accelerate only starts the processes (through torchrun); distq's dist.* keys pick the engine.
        assert config.distributed_type == "MULTI_GPU" and config.mixed_precision == "no"
    cpu, one, many = configs["cpu_2proc"], configs["single_node_gpus"], configs["multi_node"]
    assert (cpu.num_machines, cpu.num_processes, cpu.use_cpu) == (1, 2, True)
    assert (one.num_machines, one.num_processes, one.use_cpu) == (1, 8, False)
    assert many.num_machines >= 2 and many.num_processes % many.num_machines == 0 and not many.use_cpu
    assert many.main_process_ip and many.main_process_port and many.same_network


@pytest.fixture
def fake_accelerate(tmp_path):
    """A stand-in `accelerate` on PATH that prints its arguments and CUDA_VISIBLE_DEVICES."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "accelerate"
    script.write_text('#!/bin/sh\necho "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}"\nfor a in "$@"; do echo "$a"; done\n')
    script.chmod(0o755)
    return bin_dir


def test_launch_sh_passes_env_vars_as_accelerate_options(fake_accelerate, distq_cache):
    base = launch_env(distq_cache, PATH=f"{fake_accelerate}{os.pathsep}{os.environ['PATH']}")
    base.pop("CUDA_VISIBLE_DEVICES", None)
    env = {
        **base,
        "NUM_MACHINES": "2", "NUM_PROCESSES": "16", "MACHINE_RANK": "1", "MAIN_PROCESS_IP": "10.1.2.3", "MAIN_PROCESS_PORT": "29999",
        "ACCELERATE_ARGS": "--max_restarts 0 --monitor_interval 1",
    }  # fmt: skip
    args = ["launchers/accelerate/multi_node.yaml", "configs/digits_w4a4.yaml", "train.epochs=1", "--resume", "auto"]
    done = subprocess.run(["bash", LAUNCH_SH, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "CUDA_VISIBLE_DEVICES=unset",
        "launch", "--config_file", "launchers/accelerate/multi_node.yaml",
        "--num_machines", "2", "--num_processes", "16", "--machine_rank", "1",
        "--main_process_ip", "10.1.2.3", "--main_process_port", "29999",
        "--max_restarts", "0", "--monitor_interval", "1",
        "-m", "distq", "train", "configs/digits_w4a4.yaml", "train.epochs=1", "--resume", "auto",
    ]  # fmt: skip

    # No env vars: the config file's values; use_cpu: true hides the GPUs.
    cpu = subprocess.run(
        ["bash", LAUNCH_SH, "launchers/accelerate/cpu_2proc.yaml", "configs/digits_w4a4.yaml"],
        cwd=REPO_ROOT, env=base, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cpu.stdout.splitlines() == [
        "CUDA_VISIBLE_DEVICES=", "launch", "--config_file", "launchers/accelerate/cpu_2proc.yaml",
        "-m", "distq", "train", "configs/digits_w4a4.yaml",
    ]  # fmt: skip


def test_launch_sh_usage_errors(distq_cache):
    env = launch_env(distq_cache)
    bare = subprocess.run(["bash", LAUNCH_SH], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2 and "launchers/launch.sh ACCELERATE_CONFIG DISTQ_CONFIG" in bare.stderr
    assert "MAIN_PROCESS_IP" in bare.stderr
    missing = subprocess.run(
        ["bash", LAUNCH_SH, "launchers/accelerate/nope.yaml", "configs/digits_w4a4.yaml"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 2 and "no accelerate config file 'launchers/accelerate/nope.yaml'" in missing.stderr


@pytest.mark.slow  # 2+ minutes; the 2-process resume and dead-rank tests cover rendezvous by default
def test_two_machines_on_localhost_train_together(tmp_path, digits_root, distq_cache, run_distq):
    """multi_node.yaml with --num_machines 2: machine ranks 0 and 1 on this machine, one process each."""
    run_dir = tmp_path / "run"
    port = str(free_port())
    machines = []
    for rank in (0, 1):
        env = launch_env(
            distq_cache,
            NUM_MACHINES="2",
            NUM_PROCESSES="2",
            MACHINE_RANK=str(rank),
            MAIN_PROCESS_IP="127.0.0.1",
            MAIN_PROCESS_PORT=port,
        )
        args = [
            "launchers/accelerate/multi_node.yaml", "configs/digits_w4a4.yaml",
            "model.width=4", "data.batch_size=128", "data.workers=0", "train.epochs=1", "train.warmup_epochs=0",
            "log.progress=false", "log.tensorboard=false", f"run.dir={run_dir}",
        ]  # fmt: skip
        with open(tmp_path / f"machine{rank}.log", "w") as log:
            machines.append(
                subprocess.Popen(["bash", LAUNCH_SH, *args], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
    try:
        codes = [machine.wait(timeout=300) for machine in machines]
    finally:
        for machine in machines:
            if machine.poll() is None:
                machine.kill()
                machine.wait()
    logs = [(tmp_path / f"machine{rank}.log").read_text()[-3000:] for rank in (0, 1)]
    assert codes == [0, 0], logs
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["world_size"], results["epochs"], results["steps"]) == (2, 1, 5)
    assert '"world_size": 2' in logs[0] and "epoch 1/1" not in logs[1]  # rank 0 (machine 0) reports
    # The accuracy both ranks measured on their halves of the val set is the saved model's.
    alone = run_distq("eval", run_dir)
    assert alone.returncode == 0, alone.stderr
    assert json.loads(alone.stdout.splitlines()[-1])["val/top1"] == results["val/top1"]


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_cpu_2proc_trains_guided_w4a4_to_97(tmp_path, digits_root, distq_cache):
    """accelerate launch --config_file cpu_2proc.yaml, guided W4A4 with SyncBN.

    data.batch_size=32 per process keeps the recipe's global batch of 64 (and its 22 steps per
    epoch). tests/distributed/test_scaling_accuracy.py checks three seeds against 97%.
    """
    run_dir = tmp_path / "run"
    args = [
        "launchers/accelerate/cpu_2proc.yaml", "configs/digits_resnet18_w4a4_guided.yaml",
        "data.batch_size=32", "dist.sync_bn=true", "data.workers=0", "log.progress=false", f"run.dir={run_dir}",
    ]  # fmt: skip
    done = subprocess.run(
        ["bash", LAUNCH_SH, *args], cwd=REPO_ROOT, env=launch_env(distq_cache), capture_output=True, text=True, timeout=7000
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    print(json.dumps(results))
    assert (results["world_size"], results["epochs"], results["steps"]) == (2, 15, 15 * 22)
    assert results["val/top1"] >= 97.0, results
