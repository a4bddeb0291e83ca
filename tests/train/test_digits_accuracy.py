"""The default jobs reach their published accuracy on the embedded digits (minutes on a CPU)."""

from __future__ import annotations

import json
import os

import pytest


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("config,min_top1", [("digits_w4a4.yaml", 96.0), ("digits_fp.yaml", 97.0)])
def test_default_job_accuracy(config, min_top1, tmp_path, digits_root, run_distq):
    run_dir = tmp_path / "run"
    threads = str(os.cpu_count() or 1)
    proc = run_distq(
        "train", f"configs/{config}", f"run.dir={run_dir}", "log.progress=false",
        env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
        timeout=3500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs"] == 15
    assert results["val/top1"] >= min_top1, results


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_default_job_switched_from_two_processes_to_one_keeps_its_accuracy(tmp_path, digits_root, torchrun):
    """The default job on 2 processes (global batch 64), killed just after the epoch-7 checkpoint,
    finished on 1 process (32 images x 2 accumulation steps): it still reaches 96%."""
    run_dir = tmp_path / "run"
    args = ("train", "configs/digits_w4a4.yaml", "data.batch_size=32", "data.workers=0", "log.progress=false", "log.samples=true", f"run.dir={run_dir}")
    assert torchrun(2, *args, log=tmp_path / "two.log", env={"DISTQ_KILL_AT": "after-commit@7"}, timeout=3000) != 0
    assert torchrun(1, *args, "--resume", "auto", log=tmp_path / "one.log", timeout=3000) == 0, (tmp_path / "one.log").read_text()[-3000:]
    log = (tmp_path / "one.log").read_text()
    assert "at epoch 7, step 154; written by 2 process(es), now 32 images per process x 2 accumulation steps x 1 process, global batch 64 kept" in log
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["epochs"], results["steps"], results["world_size"]) == (15, 15 * 22, 1)
    assert results["val/top1"] >= 96.0, results
    from distq.train.sample_log import read_sample_log

    for epoch, used in read_sample_log(run_dir).items():
        assert len(used) == len(set(used)) == 22 * 64, epoch
