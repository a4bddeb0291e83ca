"""Method study: every training method of distq on the embedded digits, at W2A2 and W1A1.

    python benchmarks/study.py [--seeds 3] [--epochs 6] [--width 8] [--threads 1]

Trains, one run after the other through the CLI (``python -m distq train RECIPE KEY=VALUE ...``),
each method's configs/digits_* recipe with overrides for bits, seed, epochs and width:
full precision, direct low-bit training, two-stage (TS), progressive (PQ), stochastic
precision (SP), guided training (FP guide + one student), the auxiliary FP branch, cyclic
training and AQE. Schedules given in epochs by the recipes are rescaled to the same
fraction of the shorter run. Full precision has no bits, so it runs once per seed and
appears in both tables.

Collects the final val top-1 (mean +- sample std over seeds) and the wall time per run, and
writes (or replaces) the '## Method study' section of BENCHMARKS.md with the table, the
command, the machine and a short reading of the numbers. A run whose run dir already holds
results from the same command line is not trained again (``--fresh`` retrains everything),
so an interrupted study picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
BENCHMARKS = REPO_ROOT / "BENCHMARKS.md"
SECTION = "## Method study"

BITS = (2, 1)


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    recipe: str
    overrides: Callable[[int], list[str]]
    """The recipe's overrides at bit-width k (32 for full precision)."""
    uses_bits: bool = True


def _bits(k: int) -> list[str]:
    return [f"quant.w_bits={k}", f"quant.a_bits={k}"]


def _progressive(k: int) -> list[str]:
    # The recipe's 32 -> 8 -> 4 -> 2 with three stages of 3 of its 15 epochs (0.2 of the run);
    # at one bit the sequence must end at 1, so 32 -> 4 -> 2 -> 1.
    sequence = "[32, 8, 4, 2]" if k == 2 else "[32, 4, 2, 1]"
    return _bits(k) + [f"precision.progressive={{w_bits: {sequence}, a_bits: {sequence}, stages: [0.2dur, 0.2dur, 0.2dur]}}"]


def _cyclic(k: int) -> list[str]:
    # The recipe's 1 epoch fp + 2 epochs lp per bit depth, of its 18 epochs, as fractions of the run.
    return _bits(k) + ["precision.cyclic={start_bits: 4, cycles: 1, fp_length: 0.0556dur, lp_length: 0.1111dur}"]


METHODS = [
    Method("fp", "full precision", "digits_fp.yaml", (lambda k: []), uses_bits=False),
    Method("direct", "direct low-bit", "digits_w4a4.yaml", _bits),
    Method("ts", "two-stage (TS)", "digits_resnet18_w2a2_two_stage.yaml", _bits),
    Method("pq", "progressive (PQ)", "digits_resnet18_w2a2_progressive.yaml", _progressive),
    Method("sp", "stochastic precision (SP)", "digits_resnet18_w2a2_stochastic.yaml", _bits),
    Method("guided", "guided (FP guide + student)", "digits_resnet18_w4a4_guided.yaml",
           lambda k: _bits(k) + [f"guided.students=[{{w_bits: {k}, a_bits: {k}}}]"]),
    Method("aux", "auxiliary FP branch", "digits_resnet18_w2a2_aux.yaml", _bits),
    Method("cyclic", "cyclic", "digits_resnet18_w1a1_cyclic.yaml", _cyclic),
    Method("aqe", "AQE (AdamW)", "digits_resnet18_w1a2_aqe.yaml", _bits),
    # The AQE recipe also switches to AdamW: this control separates the optimizer from the estimator.
    Method("direct_adamw", "direct low-bit, AdamW (control for AQE)", "digits_w4a4.yaml",
           lambda k: _bits(k) + ["train.optimizer=adamw", "train.lr=2.0e-3", "train.weight_decay=0.0"]),
]


@dataclass
class Run:
    method: Method
    bits: int | None  # None: full precision
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method.key}" + (f"_w{self.bits}a{self.bits}" if self.bits else "") + f"_seed{self.seed}"

    def command(self, args, run_dir: Path) -> list[str]:
        overrides = [
            f"seed={self.seed}", f"train.epochs={args.epochs}", f"model.width={args.width}",
            "data.workers=0", "log.progress=false", "log.tensorboard=false", "run.keep_checkpoints=1",
            *self.method.overrides(self.bits or 32), f"run.dir={run_dir}",
        ]
        return [sys.executable, "-m", "distq", "train", str(CONFIGS / self.method.recipe), *overrides]


def plan_runs(args) -> list[Run]:
    selected = [m for m in METHODS if m.key in args.methods]
    runs = []
    for seed in range(args.seeds):
        for method in selected:
            for bits in (BITS if method.uses_bits else (None,)):
                runs.append(Run(method, bits, seed))
    return runs


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes: unlike wall time, hardly
    affected by other jobs on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def execute(run: Run, args, runs_dir: Path) -> dict:
    """Train one run (or reuse its finished results) and return what the table needs."""
    run_dir = runs_dir / run.name
    command = run.command(args, run_dir)
    record = run_dir / "study.json"
    if not args.fresh and record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("command") == command[1:] and saved.get("ok"):
            return saved | {"cached": True}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    start, cpu_before = time.perf_counter(), _children_cpu()
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu_before
    result = {"command": command[1:], "ok": proc.returncode == 0, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
    if proc.returncode == 0:
        results = json.loads((run_dir / "results.json").read_text())
        result["top1"] = results["val/top1"]
        result["models"] = results.get("models")
    else:
        result["error"] = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    run_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(result, indent=2) + "\n")
    return result


# --- the report ------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[Run], results: list[dict]) -> dict:
    """``{(method key, bits): {"top1": [...], "wall": [...], "failed": n}}``; full precision under each bits."""
    table: dict = {}
    for run, result in zip(runs, results):
        for bits in ((run.bits,) if run.bits else BITS):
            cell = table.setdefault((run.method.key, bits), {"top1": [], "wall": [], "cpu": [], "failed": 0})
            if result["ok"]:
                cell["top1"].append(result["top1"])
                cell["wall"].append(result["wall_s"])
                cell["cpu"].append(result["cpu_s"])
            else:
                cell["failed"] += 1
    return table


def fmt_cell(cell: dict | None) -> list[str]:
    """top-1 mean ± std, mean wall seconds, mean CPU seconds."""
    if cell is None or not cell["top1"]:
        return [("failed" if cell else "-"), "-", "-"]
    mean, std = mean_std(cell["top1"])
    text = f"{mean:.1f} ± {std:.1f}" + (f" ({cell['failed']} failed)" if cell["failed"] else "")
    return [text, f"{statistics.fmean(cell['wall']):.0f}", f"{statistics.fmean(cell['cpu']):.0f}"]


def reading(table: dict, methods: list[Method]) -> list[str]:
    """Plain statements from the numbers: each method against direct low-bit training, called a
    difference only when the means differ by more than the two standard deviations added."""
    lines = []
    for bits in BITS:
        base = table.get(("direct", bits))
        if not base or not base["top1"]:
            continue
        b_mean, b_std = mean_std(base["top1"])
        b_cpu = statistics.fmean(base["cpu"])
        better, worse, same = [], [], []
        for m in methods:
            cell = table.get((m.key, bits))
            if m.key in ("direct", "fp") or not cell or not cell["top1"]:
                continue
            mean, std = mean_std(cell["top1"])
            delta = mean - b_mean
            cost = statistics.fmean(cell["cpu"]) / b_cpu
            item = f"{m.label} {delta:+.1f} ({cost:.1f}x CPU time)"
            (better if delta > b_std + std else worse if -delta > b_std + std else same).append(item)
        fp = table.get(("fp", bits))
        fp_text = f"; full precision reaches {mean_std(fp['top1'])[0]:.1f}" if fp and fp["top1"] else ""
        lines.append(
            f"- **W{bits}A{bits}** (direct low-bit {b_mean:.1f} ± {b_std:.1f}{fp_text}): "
            f"better than direct by more than the seeds' spread: {', '.join(better) or 'none'}; "
            f"worse: {', '.join(worse) or 'none'}; within the spread: {', '.join(same) or 'none'}."
        )
    parts = []
    for bits in BITS:
        aqe, control = table.get(("aqe", bits)), table.get(("direct_adamw", bits))
        if aqe and control and aqe["top1"] and control["top1"]:
            (a_mean, a_std), (c_mean, c_std) = mean_std(aqe["top1"]), mean_std(control["top1"])
            verdict = "beyond" if abs(a_mean - c_mean) > a_std + c_std else "within"
            parts.append(f"W{bits}A{bits} {a_mean - c_mean:+.1f} ({verdict} the spread)")
    if parts:
        lines.append(f"- **AQE against the same optimizer without it** (direct low-bit, AdamW): {'; '.join(parts)}.")
    return lines


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (
        f"{os.cpu_count()}-core CPU ({model or platform.machine()}), no GPU, shared with other jobs; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def code_version() -> str:
    """The commit the study ran (from git, or DISTQ_STUDY_COMMIT for a tree exported without .git)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "distq", "configs"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        return f"commit {sha}" + (" with uncommitted changes in distq/ or configs/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        sha = os.environ.get("DISTQ_STUDY_COMMIT")
        return f"commit {sha} (a clean export of it)" if sha else "unknown commit"


def write_section(text: str, path: Path = BENCHMARKS) -> None:
    """Replace this study's section of BENCHMARKS.md (other sections belong to other studies)."""
    current = path.read_text() if path.is_file() else "# Benchmarks\n\nMeasured numbers, each with the machine and the exact command behind it.\n"
    start = current.find(f"\n{SECTION}\n")
    if start < 0:
        updated = current.rstrip("\n") + "\n\n" + text
    else:
        end = current.find("\n## ", start + 1)
        updated = current[: start + 1] + text + ("\n" + current[end + 1:] if end >= 0 else "")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(updated)
    os.replace(tmp, path)


def report(args, runs: list[Run], results: list[dict], started: datetime, elapsed: float, load: tuple) -> str:
    methods = [m for m in METHODS if m.key in args.methods]
    table = summarise(runs, results)
    head = "| method | recipe | " + " | ".join(f"W{b}A{b} top-1 % | wall s | CPU s" for b in BITS) + " |"
    rule = "|---|---|" + "---:|---:|---:|" * len(BITS)
    rows = []
    for m in methods:
        cells = []
        for b in BITS:
            cells += fmt_cell(table.get((m.key, b)))
        rows.append(f"| {m.label} | `{m.recipe}` | " + " | ".join(cells) + " |")
    command = "python benchmarks/study.py " + " ".join(
        f"--{k} {v}" for k, v in (("seeds", args.seeds), ("epochs", args.epochs), ("width", args.width), ("threads", args.threads))
    )
    if set(args.methods) != {m.key for m in METHODS}:
        command += " --methods " + " ".join(args.methods)
    example = next((r for r in runs if r.method.key == "pq" and r.bits == 1), runs[0])
    example_cmd = shlex.join(["python"] + example.command(args, Path("runs/study") / example.name)[1:]).replace(str(REPO_ROOT) + "/", "")
    failed = [f"{run.name}: {res['error']}" for run, res in zip(runs, results) if not res["ok"]]
    lines = [
        SECTION,
        "",
        f"Every training method on the embedded digits (1442 train / 355 val 32x32 images, 10 classes), "
        f"ResNet-18 at width {args.width}, {args.epochs} epochs, batch 64, seeds 0..{args.seeds - 1}; "
        f"final val top-1 as mean ± sample std over the seeds; mean wall time and CPU time (user + system) per run, "
        f"process start to exit. CPU time is the steadier cost measure on a shared machine.",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC; the whole study took {elapsed / 60:.0f} min for {len(runs)} runs, one after the other.",
        f"- Code: {code_version()}.",
        f"- Machine: {machine()}; {args.threads} intra-op thread(s) per run, data.workers=0. "
        f"Load average {load[0]:.1f} before, {load[1]:.1f} after: other agents' jobs shared the 2 cores, so wall times are noisy.",
        f"- Command: `{command}`",
        f"- Each run is `python -m distq train configs/RECIPE` with overrides; e.g. PQ at W1A1, seed {example.seed}: `{example_cmd}`",
        "- Methods use their recipe's settings, with schedules given in epochs rescaled to the same fraction of the run: "
        "TS quantizes activations after 0.5 of the run; PQ steps 32 -> 8 -> 4 -> 2 (W2A2) or 32 -> 4 -> 2 -> 1 (W1A1) bits "
        "every 0.2 of the run; SP ramps p from 0.5 to 1 over 0.8; the aux branch decays (cosine) to 0 at 0.5; cyclic goes "
        "4 -> 3 -> 2 (-> 1) weight bits, one cycle of 0.056 fp + 0.111 lp per depth; AQE uses AdamW (lr 2e-3) and alpha "
        "0.5 -> 1 at 0.9; guided trains an FP guide and one student (the student's accuracy is reported, the time covers both). "
        "Full precision has no bits: its runs appear in both columns.",
        "",
        head,
        rule,
        *rows,
        "",
        "Reading (generated from the numbers above; a difference counts only when the means differ by more than the two "
        "standard deviations added):",
        "",
        *reading(table, methods),
        "",
        "Caveats: these are tiny, short runs (a few hundred SGD steps of a width-"
        f"{args.width} network on an easy dataset), with each method's schedule compressed into {args.epochs} epochs and "
        "nothing tuned per method, so they say how the methods behave here, not what they give on ImageNet. "
        "Methods that spend part of the run at higher precision (TS, PQ, SP, cyclic, aux) have fewer steps at the "
        "target bits; the AQE recipe also switches to AdamW, which the AdamW control row separates from the estimator.",
    ]
    if failed:
        lines += ["", "Failed runs: " + "; ".join(failed)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--width", type=int, default=8, help="ResNet-18 base width (the recipes use 16)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--methods", nargs="+", default=[m.key for m in METHODS], choices=[m.key for m in METHODS])
    parser.add_argument("--runs-dir", default=str(REPO_ROOT / "runs" / "study"), help="where the runs go (default runs/study)")
    parser.add_argument("--fresh", action="store_true", help="train every run again even if its results are there")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    parser.add_argument("--benchmarks", default=str(BENCHMARKS), help="the BENCHMARKS.md to update (default: the repository's)")
    args = parser.parse_args(argv)

    runs = plan_runs(args)
    runs_dir = Path(args.runs_dir)
    started, start, load_before = datetime.now(timezone.utc), time.perf_counter(), os.getloadavg()[0]
    print(f"{len(runs)} runs into {runs_dir}", flush=True)
    results = []
    for i, run in enumerate(runs, 1):
        result = execute(run, args, runs_dir)
        results.append(result)
        status = f"top1 {result['top1']:.2f}" if result["ok"] else f"FAILED: {result['error']}"
        cached = " (cached)" if result.get("cached") else ""
        print(f"[{i}/{len(runs)}] {run.name}: {status}  {result['wall_s']:.0f}s{cached}  "
              f"(elapsed {(time.perf_counter() - start) / 60:.1f} min)", flush=True)
    elapsed = time.perf_counter() - start
    text = report(args, runs, results, started, elapsed, (load_before, os.getloadavg()[0]))
    (runs_dir / "study.md").write_text(text)
    if args.no_write:
        print(text)
    else:
        write_section(text, Path(args.benchmarks))
        print(f"wrote the '{SECTION}' section of {args.benchmarks}", flush=True)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
