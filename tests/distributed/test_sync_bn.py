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
# batch-norm), the torchvision loader, the recipe's schedule (warm-up over epoch 1), a global
# batch of 64 (22 steps per epoch), a checkpoint after every step.
GUIDED = ("configs/digits_resnet18_w4a4_guided.yaml", "model.width=8", "data.workers=0", "log.progress=false",
          "log.tensorboard=false", "seed=4", "run.save_every_steps=1", "run.keep_checkpoints=30")  # fmt: skip
STEPS_PER_EPOCH, STEPS = 22, 20


def stop_after(step: int) -> dict[str, str]:
    """DISTQ_KILL_AT that ends a run just after the checkpoint of ``step``."""
    return {"DISTQ_KILL_AT": f"after-commit@{(step - 0.5) / STEPS_PER_EPOCH}"}


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    from distq.checkpoint import load_state

    models = load_state(run_dir / "checkpoints" / f"step_{step:08d}")["models"]
    return {f"{m}.{k}": v for m, state in models.items() for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and "running" not in k}


def gap(a: dict, b: dict) -> float:
    """|a - b| / |a| over every weight of guide and student together."""
    return (sum(((a[k] - b[k]).double() ** 2).sum() for k in a).sqrt() / sum((a[k].double() ** 2).sum() for k in a).sqrt()).item()


@pytest.mark.slow
def test_two_processes_with_sync_bn_take_the_steps_one_process_takes(tmp_path, torchrun, run_distq, digits_root):
    """The 1-process run takes 20 steps. From its weights before steps 1, 6, 11, 16 and 20, two
    processes with SyncBN (32 images each, resumed from the 1-process checkpoint) take that step
    too: the weights after it are within the ZeRO equivalence test's fp32 tolerance (1e-5) of the
    1-process run's; with plain batch-norm they are not (> 1e-3).

    Each step starts from the same weights on purpose: low-bit training amplifies float rounding
    (a 1e-7 change moves an activation to the next level), so two runs that only sum in another
    order drift apart within a few steps whatever they compute: one process on 1 and on 2 threads
    are 0.3 apart (relative) after 20 steps of this run, and 2 processes with SyncBN drift exactly
    as fast (README, "Scaling out")."""
    reference = tmp_path / "one"
    done = run_distq("train", *GUIDED, "data.batch_size=64", "dist.sync_bn=true", f"run.dir={reference}", env=stop_after(STEPS))
    assert done.returncode == -9, done.stderr[-3000:]
    for start in (0, 5, 10, 15, 19):
        for sync in ("true", "false") if start in (0, 10) else ("true",):
            run_dir = tmp_path / f"from-{start}-sync-{sync}"
            resume = ("--resume", str(reference / "checkpoints" / f"step_{start:08d}")) if start else ()
            torchrun(2, "train", *GUIDED, "data.batch_size=32", f"dist.sync_bn={sync}", f"run.dir={run_dir}", *resume,
                     log=tmp_path / f"{run_dir.name}.log", env=stop_after(start + 1))  # fmt: skip
            if start:
                assert f"resumed from {reference / 'checkpoints' / f'step_{start:08d}'}" in (tmp_path / f"{run_dir.name}.log").read_text()
            distance = gap(weights(reference, start + 1), weights(run_dir, start + 1))
            if sync == "true":
                assert distance < 1e-5, f"step {start + 1}: 2 processes with SyncBN are {distance:.2e} from 1 process"
            else:
                assert distance > 1e-3, f"step {start + 1}: plain batch-norm only {distance:.2e} from 1 process"
    assert gap(weights(reference, STEPS), weights(reference, 1)) > 1e-2  # the weights moved: not a vacuous comparison
