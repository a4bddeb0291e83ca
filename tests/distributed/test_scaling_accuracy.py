"""Scaling out does not cost accuracy: guided W4A4 on the digits (FP guide + W4A4 student,
global batch 64, the recipe's 15 epochs) trained on 2 processes with dist.sync_bn reaches 97%
val top-1 on each of 3 seeds, as 1 process does (README, "Scaling out", has both figures and
benchmarks/scaling_accuracy.py the five-way comparison)."""

from __future__ import annotations

import json

import pytest

MIN_TOP1 = 97.0


@pytest.mark.slow
@pytest.mark.timeout(10800)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_processes_with_sync_bn_reach_97(tmp_path, seed, torchrun, digits_root):
    run_dir = tmp_path / "run"
    log = tmp_path / "train.log"
    code = torchrun(2, "train", "configs/digits_resnet18_w4a4_guided.yaml", "data.batch_size=32", "dist.sync_bn=true",
                    "data.workers=0", "log.progress=false", "log.tensorboard=false", f"seed={seed}", f"run.dir={run_dir}", log=log, timeout=7200)  # fmt: skip
    assert code == 0, log.read_text()[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    print(json.dumps(results))
    assert (results["world_size"], results["epochs"], results["steps"]) == (2, 15, 15 * 22)
    assert results["val/top1"] >= MIN_TOP1, results
