"""benchmarks/study.py: the table it writes, its reading of the numbers, and resuming a study."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import study  # noqa: E402


def _runs_and_results(top1: dict[tuple[str, int | None], list[float]]):
    by_key = {m.key: m for m in study.METHODS}
    runs, results = [], []
    for (key, bits), values in top1.items():
        for seed, value in enumerate(values):
            runs.append(study.Run(by_key[key], bits, seed))
            results.append({"ok": True, "top1": value, "wall_s": 10.0, "cpu_s": 8.0 if key != "guided" else 16.0})
    return runs, results


def test_reading_calls_a_difference_only_beyond_the_spread():
    runs, results = _runs_and_results({
        ("fp", None): [98.0, 98.0],
        ("direct", 2): [80.0, 82.0],  # 81 +- 1.41
        ("pq", 2): [90.0, 91.0],  # +9.5: beyond 1.41 + 0.71
        ("ts", 2): [81.5, 82.5],  # +1: within the spread
        ("guided", 2): [70.0, 71.0],  # -10.5: worse, at twice the CPU time
    })
    methods = [m for m in study.METHODS if m.key in {"fp", "direct", "pq", "ts", "guided"}]
    lines = study.reading(study.summarise(runs, results), methods)
    assert len(lines) == 1  # W2A2 only: no W1A1 runs
    line = lines[0]
    assert "direct low-bit 81.0 ± 1.4; full precision reaches 98.0" in line
    assert "better than direct by more than the seeds' spread: progressive (PQ) +9.5 (1.0x CPU time)" in line
    assert "worse: guided (FP guide + student) -10.5 (2.0x CPU time)" in line
    assert "within the spread: two-stage (TS) +1.0 (1.0x CPU time)" in line


def test_full_precision_fills_both_columns_and_failures_are_counted():
    runs, results = _runs_and_results({("fp", None): [97.0, 99.0], ("direct", 1): [60.0]})
    runs.append(study.Run(next(m for m in study.METHODS if m.key == "direct"), 1, 1))
    results.append({"ok": False, "error": "boom", "wall_s": 1.0, "cpu_s": 1.0})
    table = study.summarise(runs, results)
    assert table[("fp", 2)]["top1"] == table[("fp", 1)]["top1"] == [97.0, 99.0]
    assert study.fmt_cell(table[("fp", 2)]) == ["98.0 ± 1.4", "10", "8"]
    assert study.fmt_cell(table[("direct", 1)]) == ["60.0 ± 0.0 (1 failed)", "10", "8"]
    assert study.fmt_cell(None) == ["-", "-", "-"]


def test_the_section_replaces_itself_and_keeps_the_follow_up(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Other\n\nx\n\n## Method study\n\nold table\n\n## Method study, follow-up\n\nnotes\n")
    study.write_section("## Method study\n\nnew table\n", path)
    assert path.read_text() == "# Benchmarks\n\n## Other\n\nx\n\n## Method study\n\nnew table\n\n## Method study, follow-up\n\nnotes\n"


def test_one_real_run_writes_the_table_and_a_second_call_reuses_it(tmp_path, distq_cache):
    """The smallest real study: one full-precision run, 2 epochs at width 4."""
    args = ["--seeds", "1", "--epochs", "2", "--width", "4", "--methods", "fp",
            "--runs-dir", str(tmp_path / "runs"), "--benchmarks", str(tmp_path / "BENCHMARKS.md")]  # fmt: skip
    env = {**os.environ, "DISTQ_CACHE": str(distq_cache), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "study.py"), *args]
    first = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    text = (tmp_path / "BENCHMARKS.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| full precision |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    top1 = float(cells[2].split(" ± ")[0])
    assert 10.0 <= top1 <= 100.0 and cells[2] == cells[5]  # the same runs in both columns
    assert "Command: `python benchmarks/study.py --seeds 1 --epochs 2 --width 4 --threads 1 --methods fp`" in text
    second = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "(cached)" in second.stdout
    again = next(line for line in (tmp_path / "BENCHMARKS.md").read_text().splitlines() if line.startswith("| full precision |"))
    assert again.split("|")[3] == row.split("|")[3]
