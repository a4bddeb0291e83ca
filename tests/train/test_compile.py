"""train.compile=true: the models train compiled, and what is saved is the plain model."""

import json

import pytest
import torch


@pytest.mark.slow  # a cold torch.compile of the training and evaluation graphs takes ~1 min on 2 cores
def test_compiled_training_saves_the_plain_model_and_reports_its_accuracy(tmp_path, digits_root, run_distq, tiny_args):
    run_dir = tmp_path / "run"
    proc = run_distq(*tiny_args(run_dir, "train.compile=true", "train.epochs=3"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["val/top1"] > 20.0, results  # it learned (chance is 10%; eager reaches ~40% here)
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    keys = list(state["models"]["model"])
    assert "conv1.weight" in keys and not any("_orig_mod" in k for k in keys)
    # The eager evaluator, on the saved weights, measures what the compiled run reported
    # (within one image of 355: the two round differently at the quantizers' level edges).
    alone = run_distq("eval", run_dir / "checkpoints" / "last.pt")
    assert alone.returncode == 0, alone.stderr
    assert abs(json.loads(alone.stdout.splitlines()[-1])["val/top1"] - results["val/top1"]) <= 100 / 355 + 1e-9
