"""``distq plan`` on every recipe in configs/: exit 0 and one row per epoch with the schedule's
values; bad schedules exit 2 with a message naming the key."""

from __future__ import annotations

import contextlib
import io
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from distq.cli import main
from distq.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml"))
DIGITS_STEPS = 1442 // 64  # digits training images // batch size

BAD = {
    "stages-longer-than-run": (
        "digits_resnet18_w2a2_progressive.yaml", ["train.epochs=9"],
        "precision.progressive.stages add up to 198 steps (9 epochs), not less than the run (198 steps: train.epochs=9 of 22 steps)",
    ),
    "ba-longer-than-run": (
        "digits_resnet18_w2a2_stochastic.yaml", ["precision.stochastic.ramp=331ba"],
        "precision.stochastic.ramp='331ba' is longer than the run (330 steps: train.epochs=15 of 22 steps): shorten it or train longer",
    ),
    "stochastic-with-cyclic": (
        "digits_resnet18_w1a1_cyclic.yaml", ["precision.stochastic={p0: 0.5}"],
        "precision.stochastic cannot be combined with precision.cyclic",
    ),
}


# One `python -m distq plan` costs seconds of CPU (importing torch), so the default suite
# runs these recipes in subprocesses and every recipe through the same CLI entry point
# in-process; `-m slow` runs every recipe in a subprocess too.
SUBPROCESS_RECIPES = [
    "digits_resnet18_w1a1_cyclic.yaml", "digits_resnet18_w2a2_progressive.yaml",
    "imagenet_resnet18_w2a2_aux.yaml", "imagenet_resnet50_w4a4_guided.yaml",
]


def run_pool(run_distq, jobs: dict[str, tuple[str, ...]]) -> dict:
    """Run ``distq ARGS`` for every job, two at a time (one per core)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(run_distq, *args) for key, args in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


@pytest.fixture(scope="module")
def plans(distq_cache, digits_root):
    """``{recipe: (exit code, stdout)}`` of ``distq plan RECIPE`` through ``distq.cli.main``."""
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTQ_CACHE", str(distq_cache))
        for name in RECIPES:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = main(["plan", str(CONFIGS / name)])
            results[name] = (code, out.getvalue())
    return results


@pytest.fixture(scope="module")
def cli_plans(run_distq, digits_root):
    """``python -m distq plan`` in subprocesses: the representative recipes and the bad inputs."""
    jobs = {name: ("plan", str(CONFIGS / name)) for name in SUBPROCESS_RECIPES}
    jobs.update({case: ("plan", str(CONFIGS / config), *overrides) for case, (config, overrides, _) in BAD.items()})
    return run_pool(run_distq, jobs)


def table(stdout: str) -> tuple[list[str], list[list[str]]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:3] == ["epoch", "stage", "phase"])
    header = lines[start].split()
    return header, [line.split() for line in lines[start + 1:] if line.strip()]


def column(stdout: str, name: str) -> list[str]:
    header, rows = table(stdout)
    index = header.index(name)
    index -= header[:index].count("w/a")  # a model's header is two words ("NAME w/a"), its cell one
    return [row[index] for row in rows]


def model_column(stdout: str) -> list[str]:
    """The first model's bits column (its header is 'NAME w/a')."""
    header, rows = table(stdout)
    return [row[header.index("w/a") - 1] for row in rows]


def check_plan(name: str, code: int, stdout: str) -> None:
    assert code == 0
    cfg = load_config(CONFIGS / name)
    header, rows = table(stdout)
    assert len(rows) == cfg.train.epochs
    assert [row[0] for row in rows] == [str(e) for e in range(1, cfg.train.epochs + 1)]
    models = [s.name for s in cfg.guided.students] if cfg.guided else ["model"]
    assert header[-4:] == ["p", "f", "alpha", "trains"]
    assert all(row[-1] == "+".join((["guide"] if cfg.guided else []) + models) for row in rows)
    assert all(len(row) == len(header) - len(models) for row in rows)  # every "NAME w/a" header is two words
    first = stdout.splitlines()[0]
    if name.startswith("imagenet_"):
        assert "assuming ImageNet-1k's" in first and f"x {1_281_167 // cfg.data.batch_size} steps" in first
    else:
        assert f"{cfg.train.epochs} epochs x {DIGITS_STEPS} steps (1442 train images counted" in first
    # The last epoch trains the (first) model at its target bits.
    bits = (cfg.guided.students[0].w_bits, cfg.guided.students[0].a_bits) if cfg.guided else (cfg.quant.w_bits, cfg.quant.a_bits)
    assert model_column(stdout)[-1] == "/".join("fp" if b == 32 else str(b) for b in bits)


@pytest.mark.parametrize("name", RECIPES)
def test_plan_runs_on_every_recipe(plans, name):
    check_plan(name, *plans[name])


@pytest.mark.parametrize("name", SUBPROCESS_RECIPES)
def test_plan_command_on_recipes(cli_plans, plans, name):
    proc = cli_plans[name]
    assert proc.returncode == 0, proc.stderr
    check_plan(name, proc.returncode, proc.stdout)
    assert proc.stdout.rstrip("\n") == plans[name][1].rstrip("\n")


@pytest.mark.slow
def test_plan_command_on_every_recipe(run_distq, digits_root, plans):
    procs = run_pool(run_distq, {name: ("plan", str(CONFIGS / name)) for name in RECIPES})
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, proc.stderr)
        check_plan(name, proc.returncode, proc.stdout)
        assert proc.stdout.rstrip("\n") == plans[name][1].rstrip("\n"), name


def test_plan_progressive(plans):
    out = plans["digits_resnet18_w2a2_progressive.yaml"][1]
    assert model_column(out) == ["fp/fp"] * 3 + ["8/8"] * 3 + ["4/4"] * 3 + ["2/2"] * 6
    assert column(out, "stage") == [str(s) for s in [0] * 3 + [1] * 3 + [2] * 3 + [3] * 6]
    assert "policies: Progressive" in out


def test_plan_two_stage(plans):
    # weights_only 0.5dur = 165 of 330 steps: epoch 8 starts at step 154, epoch 9 at 176.
    out = plans["digits_resnet18_w2a2_two_stage.yaml"][1]
    assert model_column(out) == ["2/fp"] * 8 + ["2/2"] * 7


def test_plan_cyclic(plans):
    out = plans["digits_resnet18_w1a1_cyclic.yaml"][1]
    per_level = lambda bits: ["fp/fp", f"{bits}/1", f"{bits}/1"]  # noqa: E731
    assert model_column(out) == per_level(4) + per_level(3) + per_level(2) + per_level(1) + ["1/1"] * 6
    assert column(out, "phase") == ["fp", "lp", "lp"] * 4 + ["lp"] * 6
    assert column(out, "stage") == [str(s) for s in [0] * 3 + [1] * 3 + [2] * 3 + [3] * 9]


def test_plan_stochastic(plans):
    out = plans["digits_resnet18_w2a2_stochastic.yaml"][1]
    ramp = 0.8 * 15 * DIGITS_STEPS
    assert column(out, "p") == [f"{min(1.0, 0.5 + 0.5 * e * DIGITS_STEPS / ramp):.2f}" for e in range(15)]
    assert column(out, "p")[12:] == ["1.00"] * 3


def test_plan_aux_branch(plans):
    out = plans["digits_resnet18_w2a2_aux.yaml"][1]
    end = 0.5 * 15 * DIGITS_STEPS
    assert column(out, "f") == [f"{0.5 * (1 + math.cos(math.pi * min(e * DIGITS_STEPS, end) / end)):.3f}" for e in range(15)]
    assert column(out, "f")[0] == "1.000" and column(out, "f")[8:] == ["0.000"] * 7


def test_plan_aqe(plans):
    out = plans["digits_resnet18_w1a2_aqe.yaml"][1]
    end = round(0.9 * 15 * DIGITS_STEPS)
    assert column(out, "alpha") == [f"{min(1.0, 0.5 + 0.5 * e * DIGITS_STEPS / end):.3f}" for e in range(15)]
    assert column(out, "alpha")[-1] == "1.000" and model_column(out)[0] == "1/2"


def test_plan_guided(plans):
    out = plans["digits_resnet18_w4a4_guided.yaml"][1]
    header, rows = table(out)
    assert header[3:5] == ["student_w4a4", "w/a"]
    assert {row[3] for row in rows} == {"4/4"} and {row[-1] for row in rows} == {"guide+student_w4a4"}
    assert "guide: every layer" in out


@pytest.mark.parametrize("case", sorted(BAD))
def test_plan_rejects_bad_schedules(cli_plans, case):
    proc = cli_plans[case]
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("distq: error: ") and BAD[case][2] in proc.stderr
    assert "Traceback" not in proc.stderr
