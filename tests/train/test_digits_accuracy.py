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
