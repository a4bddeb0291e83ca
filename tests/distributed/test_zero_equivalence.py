"""Two processes (gloo, DeepSpeed ZeRO-2) and one process with the same global batch and
data order end with the same weights after 20 steps (BN-free model: per-process batch
statistics would otherwise differ by design)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("zero_equivalence_worker.py")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_two_process_zero_matches_one_process(tmp_path, zero_stage):
    single, double = tmp_path / "single.pt", tmp_path / "double.pt"
    _run([sys.executable, str(WORKER), str(single), "torch", "0"], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
          str(WORKER), str(double), "deepspeed", str(zero_stage)], tmp_path)
    a, b = torch.load(single), torch.load(double)
    assert a["initial"].keys() == b["initial"].keys()
    moved = [name for name in a["final"] if not torch.equal(a["final"][name], a["initial"][name])]
    assert len(moved) >= 4, "training did not change the weights: the comparison would be vacuous"
    a, b = a["final"], b["final"]
    for name in a:
        rel = (a[name] - b[name]).abs().max() / a[name].abs().max().clamp_min(1e-12)
        assert rel < 1e-5, f"{name}: relative difference {rel:.2e}"

