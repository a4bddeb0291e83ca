"""A run killed after a checkpoint and resumed equals the uninterrupted run, bit for bit;
checkpoint writes are atomic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from distq.train import checkpoint
from distq.train.checkpoint import CheckpointError, find_resume, load_checkpoint, save_checkpoint
from distq.train.trainer import MEASURED_KEYS

EPOCHS = 3
STEPS_PER_EPOCH = 4 * 24 // 16


def assert_same_state(a, b, where: str = "") -> None:
    """Recursively equal: tensors with torch.equal (bitwise), everything else with ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("workers", [0, 2])
def test_killed_run_resumes_bitwise(tmp_path, make_image_folder, tiny_args, start_distq, run_distq, poll, workers):
    # A small ImageNet-layout folder keeps three processes of three epochs to seconds.
    root = make_image_folder(tmp_path / "data", classes=("a", "b", "c", "d"), per_class=24, size=(32, 32))
    overrides = (
        f"data.root={root}",
        "data.batch_size=16",
        f"train.epochs={EPOCHS}",
        f"data.workers={workers}",
        "seed=5",
        "quant.w_bits=2",
        "quant.a_bits=3",
        "log.tensorboard=false",
    )
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    # Side by side, one core each. The reference also checks that --resume auto starts fresh
    # in an empty run dir.
    reference = start_distq(*tiny_args(reference_dir, *overrides), "--resume", "auto", log=tmp_path / "reference.log")
    victim = start_distq(*tiny_args(killed_dir, *overrides), log=tmp_path / "killed.log")

    last = killed_dir / "checkpoints" / "last.pt"
    assert poll(lambda: last.exists() or victim.poll() is not None, timeout=300), "no checkpoint appeared"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    killed_at = load_checkpoint(last)["epoch"]
    assert 1 <= killed_at < EPOCHS
    assert not (killed_dir / "results.json").exists()

    assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()
    assert "resumed from" not in (tmp_path / "reference.log").read_text()

    resumed = run_distq(*tiny_args(killed_dir, *overrides), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {last} at epoch {killed_at}, step {killed_at * STEPS_PER_EPOCH}" in resumed.stdout

    want = load_checkpoint(reference_dir / "checkpoints" / "last.pt")
    got = load_checkpoint(last)
    assert (got["epoch"], got["step"]) == (want["epoch"], want["step"]) == (EPOCHS, EPOCHS * STEPS_PER_EPOCH)
    tensors = [k for k, v in want["models"]["model"].items() if isinstance(v, torch.Tensor)]
    assert len(tensors) > 50
    for name in tensors:
        assert torch.equal(got["models"]["model"][name], want["models"]["model"][name]), name
    assert_same_state(got["models"], want["models"], "models")
    assert_same_state(got["optimizer"], want["optimizer"], "optimizer")
    assert got["history"] == want["history"]
    results = [json.loads((d / "results.json").read_text()) for d in (killed_dir, reference_dir)]
    for r in results:
        for key in MEASURED_KEYS:
            r.pop(key, None)
    assert results[0] == results[1]


def tiny_state(value: float) -> dict:
    return {"config": {}, "classes": ["a"], "epoch": int(value), "models": {"model": {"w": torch.full((1000,), value)}}}


def test_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    last = save_checkpoint(tiny_state(1), tmp_path, epoch=1, keep=0)
    assert last == tmp_path / "checkpoints" / "last.pt"

    def save_half_then_fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tiny_state(2), tmp_path, epoch=2, keep=0)
    monkeypatch.undo()

    state = load_checkpoint(last)
    assert state["epoch"] == 1 and torch.equal(state["models"]["model"]["w"], torch.full((1000,), 1.0))
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]  # no temporary file left


def test_checkpoint_survives_sigkill_during_writes(tmp_path, poll):
    """A process killed at a random moment of a stream of checkpoint writes leaves a last.pt
    that loads and is one complete checkpoint, not a mix of two."""
    writer = textwrap.dedent(
        f"""
        import torch
        from distq.train.checkpoint import save_checkpoint
        for i in range(1, 10_000):
            save_checkpoint({{"config": {{}}, "epoch": i, "models": {{"model": {{"w": torch.full((1 << 21,), float(i))}}}}}},
                            {str(tmp_path)!r}, epoch=i, keep=2)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", writer], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        last = tmp_path / "checkpoints" / "last.pt"
        assert poll(lambda: find_resume(tmp_path) is not None, timeout=120)
        assert poll(lambda: load_checkpoint(last)["epoch"] >= 3, timeout=120)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    state = load_checkpoint(last)
    epoch = state["epoch"]
    assert torch.equal(state["models"]["model"]["w"], torch.full((1 << 21,), float(epoch)))
    kept = sorted(p.name for p in last.parent.glob("epoch_*.pt"))
    assert 1 <= len(kept) <= 3  # keep=2, plus at most one written before the pruning
    for name in kept:
        assert load_checkpoint(last.parent / name)["epoch"] == int(name[6:10])


def test_find_resume_and_missing_checkpoint(tmp_path):
    assert find_resume(tmp_path) is None
    save_checkpoint(tiny_state(1), tmp_path, epoch=1, keep=3)
    assert find_resume(tmp_path) == tmp_path / "checkpoints" / "last.pt"
    assert (tmp_path / "checkpoints" / "epoch_0001.pt").is_file()
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_keep_checkpoints_prunes_old_epochs(tmp_path):
    for epoch in range(1, 6):
        save_checkpoint(tiny_state(epoch), tmp_path, epoch=epoch, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_0004.pt", "epoch_0005.pt", "last.pt"]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 5


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
def test_damaged_checkpoints_are_reported(tmp_path, how):
    last = save_checkpoint(tiny_state(1), tmp_path, epoch=1, keep=0)
    bad = tmp_path / f"{how}.pt"
    bad.write_bytes(damaged(last.read_bytes(), how))
    with pytest.raises(CheckpointError, match=f"checkpoint '.*{how}.pt' is corrupt or not a distq checkpoint"):
        load_checkpoint(bad)


def test_a_float_state_dict_is_not_a_training_checkpoint(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match="is not a distq training checkpoint"):
        load_checkpoint(path)
    newer = tmp_path / "newer.pt"
    torch.save({**tiny_state(1), "format": checkpoint.FORMAT_VERSION + 1}, newer)
    with pytest.raises(CheckpointError, match="newer than this distq"):
        load_checkpoint(newer)
