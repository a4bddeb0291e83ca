"""benchmarks/study.py: the table it writes, its reading of the numbers, and resuming a study."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


# --- the finetune protocol ---------------------------------------------------------------------


def _finetune_args(tmp_path: Path, **changes) -> argparse.Namespace:
    values = dict(protocol="finetune", seeds=2, epochs=6, finetune_epochs=4, width=8, threads=1,
                  methods=[m.key for m in study.FINETUNE_METHODS])  # fmt: skip
    return argparse.Namespace(**(values | changes))


def _overrides(command: list[str]) -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in command[5:])


def test_every_finetune_run_starts_from_its_seeds_full_precision_run(tmp_path):
    args = _finetune_args(tmp_path)
    runs = study.plan_runs(args)
    assert len(runs) == args.seeds * (1 + 3 * (len(study.FINETUNE_METHODS) - 1))
    for seed in range(args.seeds):
        of_seed = [r for r in runs if r.seed == seed]
        assert of_seed[0].method.key == "fp" and of_seed[0].bits is None  # trained before the runs that need it
        assert {r.bits for r in of_seed[1:]} == {4, 2, 1}
    fp_run = runs[0]
    fp = _overrides(fp_run.command(args, tmp_path / fp_run.name))
    assert fp["train.epochs"] == "6" and "model.pretrained" not in fp and "train.milestones" not in fp
    for run in runs:
        if run.method.key == "fp":
            continue
        command = run.command(args, tmp_path / run.name)
        given = _overrides(command)
        start = str(tmp_path / f"fp_seed{run.seed}")
        assert given["model.pretrained"] == start, run.name
        assert given.get("guided.guide_pretrained") == (start if run.method.key == "guided" else None), run.name
        assert given["train.epochs"] == "4" and given["quant.w_bits"] == given["quant.a_bits"] == str(run.bits)
        assert given.get("train.milestones") == (None if run.method.key == "aqe" else "[2, 3]"), run.name
        assert Path(command[4]).name == run.method.recipe and Path(command[4]).is_file()


def test_the_learning_rate_decays_at_the_authors_fractions_of_any_run_length():
    assert study.milestones(30) == [15, 25]  # the authors' ImageNet epochs
    assert study.milestones(4) == [2, 3]
    assert study.milestones(12) == [6, 10]
    for epochs in range(4, 41):
        first, second = study.milestones(epochs)
        assert 0 < first < second < epochs, epochs


def test_progressive_fine_tuning_starts_below_full_precision_and_ends_at_the_target():
    pq = next(m for m in study.FINETUNE_METHODS if m.key == "pq")
    for bits in study.FINETUNE_BITS:
        (sequence,) = [o for o in pq.overrides(bits) if o.startswith("precision.progressive=")]
        w_bits = [int(b) for b in sequence.split("w_bits: [")[1].split("]")[0].split(", ")]
        assert w_bits[0] < 32 and w_bits[-1] == bits and w_bits == sorted(w_bits, reverse=True)


def test_the_finetune_recipes_hold_the_settings_the_study_writes_down():
    """Each recipe run as it is reproduces the study's fine-tuning settings at its own length."""
    from distq.config import load_config

    for m in study.FINETUNE_METHODS[1:]:
        cfg = load_config(REPO_ROOT / "configs" / m.recipe)
        assert cfg.model.pretrained == "runs/digits_fp", m.recipe
        assert cfg.train.warmup_epochs == 0, m.recipe
        if m.multistep:
            assert (cfg.train.optimizer, cfg.train.lr, cfg.train.schedule) == ("sgd", 5e-3, "multistep"), m.recipe
            assert cfg.train.milestones == study.milestones(cfg.train.epochs), m.recipe
        if m.key == "guided":
            assert cfg.guided.guide_pretrained == "runs/digits_fp"
            assert (cfg.guided.guide_lr, cfg.guided.student_lr) == (1e-3, 5e-3)


def test_the_claims_table_calls_a_difference_only_beyond_the_spread():
    by_key = {m.key: m for m in study.FINETUNE_METHODS}
    top1 = {
        ("fp", None): [98.0, 98.0],
        ("direct", 4): [90.0, 92.0], ("direct", 1): [50.0, 52.0],  # 91 +- 1.41, 51 +- 1.41
        ("cyclic", 4): [91.0, 92.0],  # +0.5: within
        ("cyclic", 1): [60.0, 61.0],  # +9.5: beyond
        ("aqe", 4): [80.0, 81.0],  # -10.5: beyond, worse
        ("aqe", 1): [52.0, 53.0],  # +1.5: within 1.41 + 0.71
    }  # fmt: skip
    runs, results = [], []
    for (key, bits), values in top1.items():
        for seed, value in enumerate(values):
            runs.append(study.Run(by_key[key], bits, seed))
            results.append({"ok": True, "top1": value, "wall_s": 10.0, "cpu_s": 8.0})
    table = study.summarise(runs, results, study.FINETUNE_BITS)
    assert study.versus_direct(table, "cyclic", 1)[:2] == (9.5, "better")
    assert study.versus_direct(table, "aqe", 4)[:2] == (-10.5, "worse")
    assert study.versus_direct(table, "aqe", 1)[1] == "within"
    assert study.versus_direct(table, "cyclic", 2) is None  # no W2A2 runs
    methods = [by_key[k] for k in ("fp", "direct", "cyclic", "aqe")]
    rows = study.claims(table, methods, study.FINETUNE_BITS)
    cyclic = next(r for r in rows if r.startswith("| cyclic |"))
    assert "arXiv:2206.12794" in cyclic and "+5.80 top-1" in cyclic
    assert "| +0.5 | - | +9.5 (beyond) | better than direct at W1A1; no difference beyond the spread at W4A4 |" in cyclic
    aqe = next(r for r in rows if r.startswith("| AQE"))
    assert "| -10.5 (beyond) | - | +1.5 | worse than direct at W4A4; no difference beyond the spread at W1A1 |" in aqe
    lines = study.reading(table, methods, study.FINETUNE_BITS, direct="direct fine-tuning", fp="the full-precision start reaches")
    assert lines[0].startswith("- **W4A4** (direct fine-tuning 91.0 ± 1.4; the full-precision start reaches 98.0)")
    assert "worse: AQE (AdamW) -10.5 (1.0x CPU time)" in lines[0]


@pytest.mark.slow
def test_a_real_finetune_study_starts_from_the_fp_checkpoint_and_writes_only_where_told(tmp_path, distq_cache):
    """FP pretraining then direct fine-tuning, at width 4: the fine-tuned runs name the seed's FP
    run as their start, and a study of some methods leaves BENCHMARKS.md alone unless told."""
    args = ["--protocol", "finetune", "--seeds", "1", "--epochs", "2", "--finetune-epochs", "4", "--width", "4",
            "--methods", "direct", "--runs-dir", str(tmp_path / "runs")]  # fmt: skip
    env = {**os.environ, "DISTQ_CACHE": str(distq_cache), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "study.py"), *args]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "[1/4] fp_seed0" in done.stdout and "BENCHMARKS.md left as it is" in done.stdout
    fp_dir = tmp_path / "runs" / "fp_seed0"
    assert (fp_dir / "checkpoints" / "latest.json").is_file()
    for bits in (4, 2, 1):
        config = (tmp_path / "runs" / f"direct_w{bits}a{bits}_seed0" / "config.yaml").read_text()
        assert f"pretrained: {fp_dir}" in config and f"w_bits: {bits}" in config
    text = (tmp_path / "runs" / "study.md").read_text()
    assert text.startswith(study.FINETUNE_SECTION + "\n")
    assert "Command: `python benchmarks/study.py --protocol finetune --seeds 1 --epochs 2 --finetune-epochs 4 --width 4 --threads 1 --methods fp direct`" in text
