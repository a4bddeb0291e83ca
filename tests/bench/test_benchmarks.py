"""The speed benchmarks run end to end (tiny settings) and keep BENCHMARKS.md sections apart."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO_ROOT / "benchmarks"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def report(tmp_path) -> Path:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nintro\n\n## Someone else's section (2026-01-01 00:00 UTC)\n\ntheir numbers\n")
    return path


def sections(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("## ")]


def test_write_section_appends_then_replaces_only_its_own(report, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from timing import write_section

    write_section("Speed", "first", report)
    write_section("Speed (torch.compile)", "compiled", report)
    write_section("Speed", "second", report)
    text = report.read_text()
    assert "their numbers" in text and "first" not in text and "second" in text and "compiled" in text
    assert [s.split(" (20")[0] for s in sections(report)] == ["## Someone else's section", "## Speed", "## Speed (torch.compile)"]


def test_quantizer_speed_writes_its_section(report):
    for _ in range(2):  # the second run replaces the first run's section
        proc = run("quantizer_speed.py", "--quick", "--report", str(report))
        assert proc.returncode == 0, proc.stderr
    assert "worst ratio to clamp" in proc.stdout
    text = report.read_text()
    assert "their numbers" in text
    assert sum(s.startswith("## Quantizer speed") for s in sections(report)) == 1
    assert "| weight 64x64x3x3 |" in text and "| activation 32x64x8x8 |" in text


def test_step_time_writes_its_section(report):
    proc = run("step_time.py", "--archs", "resnet18", "--batch", "2", "--size", "32", "--classes", "10", "--rounds", "1", "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    assert "W4A4 / float step time" in proc.stdout
    assert "| resnet18 |" in report.read_text()


def test_guided_step_writes_its_section(report):
    proc = run("guided_step.py", "--batch", "2", "--size", "32", "--classes", "10", "--rounds", "1", "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    assert "guided / separate" in proc.stdout
    assert "| guided (3 models) |" in report.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_gpu_throughput_without_a_gpu_says_so_and_measures_nothing(report):
    before = report.read_text()
    proc = run("gpu_throughput.py", "--report", str(report), timeout=120)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
    assert report.read_text() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path")
def test_gpu_throughput_code_runs_on_cpu_as_a_smoke_test(report):
    before = report.read_text()
    args = ["--allow-cpu", "--arch", "resnet18", "--batch", "2", "--size", "32", "--steps", "1", "--warmup", "1", "--rounds", "1"]
    proc = run("gpu_throughput.py", *args, "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    assert "guided" in proc.stdout and "images/s" in proc.stdout
    assert report.read_text() == before  # a CPU run is never reported


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_gpu_all_without_a_gpu_says_so_and_runs_nothing(tmp_path):
    env = {**ENV, "PYTHON": sys.executable, "LOG": str(tmp_path / "log")}
    env.pop("NGPUS", None)
    proc = subprocess.run(["bash", str(BENCHMARKS / "gpu_all.sh")], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "log").iterdir()) == []  # no step ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_gpu_profile_without_a_gpu_says_so():
    proc = run("gpu_profile.py", timeout=120)
    assert proc.returncode == 2
    assert "gpu_profile.py needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_shard_loading_writes_its_section(report, tmp_path):
    pytest.importorskip("nvidia.dali")
    env = {**ENV, "DISTQ_CACHE": str(tmp_path / "cache")}
    args = ["--images", "128", "--batch-size", "16", "--workers", "1", "--rounds", "1", "--shard-size", "2MB", "--report", str(report)]
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "shard_loading.py"), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    text = report.read_text()
    assert "their numbers" in text and sum(s.startswith("## Training data loading: shards vs folders") for s in sections(report)) == 1
    assert "| dali | shards |" in text and "| torchvision | folders |" in text and "x fewer** (target >= 1000x)" in text
