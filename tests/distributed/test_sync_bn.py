"""Synchronised batch-norm on the CPU: N ranks with B images each compute what one process
computes with N x B images (outputs, input and parameter gradients, running statistics), and
a real 2-process run with dist.sync_bn follows the 1-process run of the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

WORKER = Path(__file__).with_name("sync_bn_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_normalise_with_the_global_batch(tmp_path, world):
    out = tmp_path / "sync.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={free_port()}", str(WORKER), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(out)
    assert got["synced"] and got["same_parameter"]  # converted in place: an optimizer built before still holds the weights

    # The reference: plain BatchNorm over the whole batch in one process (same seeds as the worker).
    torch.manual_seed(1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(24, 5, 6, 7, generator=generator) * 3 + 1
    dy = torch.randn(24, 5, 6, 7, generator=generator)
    net = nn.Sequential(nn.Conv2d(5, 5, 1), nn.BatchNorm2d(5))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5, generator=generator)
        net[1].bias.normal_(generator=generator)
    xs = x.clone().requires_grad_()
    y = net(xs)
    (y * dy).sum().backward()
    grads = torch.cat([net[1].weight.grad, net[1].bias.grad, net[0].weight.grad.flatten()])
    torch.testing.assert_close(got["y"], y.detach(), rtol=0, atol=2e-6)
    torch.testing.assert_close(got["x_grad"], xs.grad, rtol=0, atol=2e-6)
    torch.testing.assert_close(got["grads"], grads, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got["running_mean"], net[1].running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(got["running_var"], net[1].running_var, rtol=0, atol=1e-6)
    # Plain BatchNorm on half the batch is far off: the comparison can fail.
    half = nn.functional.batch_norm(x[:12], None, None, net[1].weight, net[1].bias, training=True)
    assert (half - y[:12]).abs().max() > 1e-2


# The real digits pipeline: guided W4A4 (FP guide + W4A4 student, ResNet-18 width 8 with
# batch-norm), torchvision loader, 1 epoch of 22 steps at a global batch of 64.
GUIDED = ("configs/digits_resnet18_w4a4_guided.yaml", "model.width=8", "data.workers=0", "train.epochs=1", "train.warmup_epochs=0",
          "log.progress=false", "log.tensorboard=false", "seed=4")  # fmt: skip


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from distq.checkpoint import load_state

    models = load_state(run_dir)["models"]
    return {f"{m}.{k}": v for m, state in models.items() for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def relative_gap(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)).item() for k in a)


@pytest.fixture(scope="module")
def guided_runs(tmp_path_factory, torchrun, run_distq, digits_root):
    root = tmp_path_factory.mktemp("bn-equivalence")
    one = run_distq("train", *GUIDED, "data.batch_size=64", f"run.dir={root / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    for name, sync in (("synced", "true"), ("plain", "false")):
        log = root / f"{name}.log"
        code = torchrun(2, "train", *GUIDED, "data.batch_size=32", f"dist.sync_bn={sync}", "dist.zero_stage=2", f"run.dir={root / name}", log=log)
        assert code == 0, log.read_text()[-3000:]
    return {name: final_weights(root / name) for name in ("one", "synced", "plain")}


def test_two_processes_with_sync_bn_train_what_one_process_trains(guided_runs):
    """Within the ZeRO equivalence test's fp32 tolerance (1e-5 of the largest weight), every
    weight and running statistic of guide and student; plain batch-norm is not."""
    one, synced, plain = guided_runs["one"], guided_runs["synced"], guided_runs["plain"]
    assert one.keys() == synced.keys() and len(one) > 100
    assert relative_gap(one, synced) < 1e-5
    assert relative_gap(one, plain) > 1e-3
