"""Method study: every training method of distq on the embedded digits, under two protocols.

    python benchmarks/study.py [--protocol scratch] [--seeds 3] [--epochs 6] [--width 8] [--threads 1]
    python benchmarks/study.py --protocol finetune [--seeds 3] [--epochs 6] [--finetune-epochs 4] [--width 8]

``scratch`` (the default) trains every method from random weights at W2A2 and W1A1.
``finetune`` follows the papers' protocol: per seed, the full-precision model is trained once
(configs/digits_fp.yaml, ``--epochs``), and every method starts from that checkpoint at W4A4, W2A2
and W1A1 with its configs/digits_*_finetune.yaml recipe (``--finetune-epochs``): direct low-bit
fine-tuning (the control), two-stage, progressive, stochastic precision, guided (guide and
student from the FP model), auxiliary branch, cyclic and AQE.

Trains, one run after the other through the CLI (``python -m distq train RECIPE KEY=VALUE ...``),
each method's configs/digits_* recipe with overrides for bits, seed, epochs and width:
full precision, direct low-bit training, two-stage (TS), progressive (PQ), stochastic
precision (SP), guided training (FP guide + one student), the auxiliary FP branch, cyclic
training and AQE. Schedules given in epochs by the recipes are rescaled to the same
fraction of the shorter run. Full precision has no bits, so it runs once per seed and
appears in both tables.

Collects the final val top-1 (mean +- sample std over seeds) and the time per run, and
writes (or replaces) the protocol's section of BENCHMARKS.md ('## Method study' or
'## Method study: fine-tuning from full precision') with the table, the command, the machine
and a short reading of the numbers. A study of only some methods writes BENCHMARKS.md only when
``--benchmarks`` names the file (otherwise it prints the section), so reproducing a few cells
does not replace the published table. A run whose run dir already holds
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
FINETUNE_SECTION = "## Method study: fine-tuning from full precision"
FINETUNE_BITS = (4, 2, 1)
FINETUNE_MILESTONES = (1 / 2, 5 / 6)
"""Multistep decays as fractions of the fine-tuning run: the authors' epochs 15 and 25 of 30."""


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    recipe: str
    overrides: Callable[[int], list[str]]
    """The recipe's overrides at bit-width k (32 for full precision)."""
    uses_bits: bool = True
    pretrained_keys: tuple[str, ...] = ("model.pretrained",)
    """finetune protocol: the keys that receive the full-precision run directory."""
    multistep: bool = True
    """finetune protocol: the recipe decays the learning rate at FINETUNE_MILESTONES."""
    only_bits: tuple[int, ...] | None = None
    """The bit-widths the method is defined for, of the protocol's (None: all of them)."""


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


def _progressive_finetune(k: int) -> list[str]:
    # The FP model is the sequence's 32-bit stage: from it, 8 -> 4 -> 2 (the recipe), 8 -> 4, or
    # 4 -> 2 -> 1, in equal parts of the run.
    sequence, stages = {4: ("[8, 4]", "[0.5dur]"), 2: ("[8, 4, 2]", "[0.3333dur, 0.3333dur]"),
                        1: ("[4, 2, 1]", "[0.3333dur, 0.3333dur]")}[k]  # fmt: skip
    return _bits(k) + [f"precision.progressive={{w_bits: {sequence}, a_bits: {sequence}, stages: {stages}}}"]


FINETUNE_METHODS = [
    Method("fp", "full-precision pretraining", "digits_fp.yaml", (lambda k: []), uses_bits=False, pretrained_keys=()),
    Method("direct", "direct low-bit fine-tuning", "digits_w4a4_finetune.yaml", _bits),
    Method("ts", "two-stage (TS)", "digits_resnet18_w2a2_two_stage_finetune.yaml", _bits),
    Method("pq", "progressive (PQ)", "digits_resnet18_w2a2_progressive_finetune.yaml", _progressive_finetune),
    Method("sp", "stochastic precision (SP)", "digits_resnet18_w2a2_stochastic_finetune.yaml", _bits),
    Method("guided", "guided (FP guide + student)", "digits_resnet18_w4a4_guided_finetune.yaml",
           lambda k: _bits(k) + [f"guided.students=[{{w_bits: {k}, a_bits: {k}}}]"],
           pretrained_keys=("model.pretrained", "guided.guide_pretrained")),
    Method("aux", "auxiliary FP branch", "digits_resnet18_w2a2_aux_finetune.yaml", _bits),
    Method("cyclic", "cyclic", "digits_resnet18_w1a1_cyclic_finetune.yaml", _bits),
    Method("aqe", "AQE (AdamW)", "digits_resnet18_w1a2_aqe_finetune.yaml", _bits, multistep=False),
]

LSQ = "quant.method=lsq"
QUANTIZER_METHODS = [
    *(m for m in FINETUNE_METHODS if m.key in ("fp", "direct")),
    Method("lsq", "LSQ (learned step size)", "digits_resnet18_w4a4_lsq_finetune.yaml", _bits, only_bits=(4, 2)),
    Method("pact", "PACT (learned clipping)", "digits_resnet18_w4a4_pact_finetune.yaml", _bits, only_bits=(4, 2)),
    Method("pq_lsq", "progressive (PQ) with LSQ", "digits_resnet18_w2a2_progressive_finetune.yaml",
           lambda k: _progressive_finetune(k) + [LSQ], only_bits=(4, 2)),
    Method("guided_lsq", "guided, LSQ student", "digits_resnet18_w4a4_guided_finetune.yaml",
           lambda k: _bits(k) + [f"guided.students=[{{w_bits: {k}, a_bits: {k}, method: lsq, name: student}}]"],
           pretrained_keys=("model.pretrained", "guided.guide_pretrained"), only_bits=(4, 2)),
]
"""The learned-scale quantizers beside direct DoReFa fine-tuning, and the staged methods run with LSQ."""

QUANTIZER_SETTINGS = (
    " In this study: LSQ (`quant.method=lsq`) learns one step per layer and activation, started at the paper's "
    "2 mean|v| / sqrt(Q_P) from the weights and the first training batch, gradient scale 1 / sqrt(N Q_P), no weight "
    "decay on the steps. PACT (`quant.method=pact`) learns one clipping level per activation from the paper's 10, with "
    "its L2 penalty 2e-4 as weight decay, and DoReFa weights. Both are defined from 2 bits (PACT's activations; at 1 "
    "bit and alpha 10 every activation is 0 and the first step diverges), so this study has no W1A1 column. "
    "PQ with LSQ is the PQ recipe (8 -> 4, 8 -> 4 -> 2) with quant.method=lsq: each layer's step is learned at the "
    "target bits and rescaled by sqrt(Q_P(target) / Q_P(b)) while the layer runs at b bits. Guided with LSQ: the FP "
    "guide and an LSQ student (guided.students[].method=lsq). The direct and full-precision rows are the DoReFa "
    "fine-tuning study's own runs (the same commands, reused)."
)

PAPER_RESULTS = {
    "direct": "the baseline each paper improves on",
    "ts": "*Towards Effective Low-bitwidth Convolutional Neural Networks* (arXiv:1711.00205): with PQ and guided "
          "training, W4A4 AlexNet and ResNet-50 lose nothing against full precision, W2A2 close (abstract; the "
          "per-method ImageNet table is not in our notes)",
    "pq": "*Towards Effective Low-bitwidth Convolutional Neural Networks* (arXiv:1711.00205): as TS",
    "sp": "*Effective Training of Convolutional Neural Networks with Low-bitwidth Weights and Activations* "
          "(arXiv:1908.04680): a one-stage alternative to TS/PQ at lower training cost (no ImageNet number in our notes)",
    "guided": "arXiv:1711.00205 and arXiv:1908.04680: W4A4 AlexNet and ResNet-50 with no loss against full "
              "precision (abstract); authors' recipe: guide and student from the pretrained FP model",
    "aux": "*Progressive Learning of Low-Precision Networks* (arXiv:1905.11781): faster convergence and higher "
           "accuracy on SVHN, CIFAR and ILSVRC-2012 (no number in our notes)",
    "cyclic": "*CTMQ: Cyclic Training of Convolutional Neural Networks with Multiple Quantization Steps* "
              "(arXiv:2206.12794): binarized ResNet-18 on ImageNet +5.80 top-1 / +6.85 top-5 over its baseline (abstract)",
    "aqe": "*Propagating Asymptotic-Estimated Gradients for Low Bitwidth Quantized Neural Networks* (arXiv:2003.04296): "
           "ResNet-18 on ImageNet, top-1 error W1A2 42.16, W1A1 47.87 (XNOR-Net 48.80), full precision 30.46",
    # Recalled from the papers' ImageNet tables; this machine cannot reach the papers to re-read them.
    "lsq": "*Learned Step Size Quantization* (arXiv:1902.08153), Table 1, ResNet-18 top-1: W2A2 67.6, W3A3 70.2, "
           "W4A4 71.1, full precision 70.5 (fine-tuned from the FP model, 90 epochs)",
    "pact": "*PACT: Parameterized Clipping Activation for Quantized Neural Networks* (arXiv:1805.06085), ResNet-18 "
            "top-1: W2A2 64.4, W3A3 68.1, W4A4 69.2, full precision 70.2",
    "pq_lsq": "no paper combines them: PQ's schedule (arXiv:1711.00205) with LSQ as its quantizer",
    "guided_lsq": "no paper combines them: guided training (arXiv:1711.00205) with an LSQ student",
}
"""Each paper's own claim for its method, for the finetune table (the papers train on ImageNet)."""


@dataclass(frozen=True)
class Protocol:
    name: str
    bits: tuple[int, ...]
    methods: list[Method]
    section: str
    runs_dir: str
    finetunes: bool = False
    """Every run but the full-precision one starts from its seed's full-precision run."""


QUANTIZERS_SECTION = "## Method study: learned-scale quantizers (LSQ, PACT), fine-tuning from full precision"

PROTOCOLS = {
    "scratch": Protocol("scratch", BITS, METHODS, SECTION, "study"),
    "finetune": Protocol("finetune", FINETUNE_BITS, FINETUNE_METHODS, FINETUNE_SECTION, "study_finetune", True),
    # The finetune protocol's runs, other methods: same runs directory, so fp and direct are shared.
    "quantizers": Protocol("quantizers", (4, 2), QUANTIZER_METHODS, QUANTIZERS_SECTION, "study_finetune", True),
}


def milestones(epochs: int) -> list[int]:
    """FINETUNE_MILESTONES in whole epochs of a fine-tuning run of ``epochs`` (at least 4, so
    that the two decays fall on different epochs)."""
    return [max(1, min(epochs - 1, round(f * epochs))) for f in FINETUNE_MILESTONES]


@dataclass
class Run:
    method: Method
    bits: int | None  # None: full precision
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method.key}" + (f"_w{self.bits}a{self.bits}" if self.bits else "") + f"_seed{self.seed}"

    def fp_dir(self, run_dir: Path) -> Path:
        """finetune protocol: the run directory of this seed's full-precision pretraining."""
        return run_dir.with_name(f"fp_seed{self.seed}")

    def command(self, args, run_dir: Path) -> list[str]:
        finetune = PROTOCOLS[getattr(args, "protocol", "scratch")].finetunes and self.method.uses_bits
        epochs = args.finetune_epochs if finetune else args.epochs
        overrides = [
            f"seed={self.seed}", f"train.epochs={epochs}", f"model.width={args.width}",
            "data.workers=0", "log.progress=false", "log.tensorboard=false", "run.keep_checkpoints=1",
            *self.method.overrides(self.bits or 32),
        ]
        if finetune:
            overrides += [f"{key}={self.fp_dir(run_dir)}" for key in self.method.pretrained_keys]
            if self.method.multistep:
                overrides.append(f"train.milestones={milestones(epochs)}")
        overrides.append(f"run.dir={run_dir}")
        return [sys.executable, "-m", "distq", "train", str(CONFIGS / self.method.recipe), *overrides]


def plan_runs(args) -> list[Run]:
    """Seed by seed, each method at each bit-width; a full-precision run (finetune: the
    pretraining every other run of its seed starts from) comes first in its seed."""
    protocol = PROTOCOLS[getattr(args, "protocol", "scratch")]
    selected = [m for m in protocol.methods if m.key in args.methods]
    runs = []
    for seed in range(args.seeds):
        for method in selected:
            for bits in (tuple(b for b in protocol.bits if b in (method.only_bits or protocol.bits)) if method.uses_bits else (None,)):
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


def summarise(runs: list[Run], results: list[dict], bits_list: tuple[int, ...] = BITS) -> dict:
    """``{(method key, bits): {"top1": [...], "wall": [...], "failed": n}}``; full precision under each bits."""
    table: dict = {}
    for run, result in zip(runs, results):
        for bits in ((run.bits,) if run.bits else bits_list):
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


def versus_direct(table: dict, key: str, bits: int) -> tuple[float, str, float] | None:
    """Method ``key`` at ``bits`` against direct low-bit training: (difference of the means,
    "better" / "worse" / "within", CPU time ratio), or None where either has no result. A
    difference counts only when the means differ by more than the two standard deviations added."""
    base, cell = table.get(("direct", bits)), table.get((key, bits))
    if not base or not base["top1"] or not cell or not cell["top1"]:
        return None
    (b_mean, b_std), (mean, std) = mean_std(base["top1"]), mean_std(cell["top1"])
    delta = mean - b_mean
    verdict = "better" if delta > b_std + std else "worse" if -delta > b_std + std else "within"
    return delta, verdict, statistics.fmean(cell["cpu"]) / statistics.fmean(base["cpu"])


def reading(table: dict, methods: list[Method], bits_list: tuple[int, ...] = BITS,
            direct: str = "direct low-bit", fp: str = "full precision reaches") -> list[str]:
    """Plain statements from the numbers: each method against direct low-bit training, called a
    difference only when the means differ by more than the two standard deviations added."""
    lines = []
    for bits in bits_list:
        base = table.get(("direct", bits))
        if not base or not base["top1"]:
            continue
        b_mean, b_std = mean_std(base["top1"])
        groups: dict[str, list[str]] = {"better": [], "worse": [], "within": []}
        for m in methods:
            compared = versus_direct(table, m.key, bits) if m.key not in ("direct", "fp") else None
            if compared:
                delta, verdict, cost = compared
                groups[verdict].append(f"{m.label} {delta:+.1f} ({cost:.1f}x CPU time)")
        fp_cell = table.get(("fp", bits))
        fp_text = f"; {fp} {mean_std(fp_cell['top1'])[0]:.1f}" if fp_cell and fp_cell["top1"] else ""
        lines.append(
            f"- **W{bits}A{bits}** ({direct} {b_mean:.1f} ± {b_std:.1f}{fp_text}): "
            f"better than direct by more than the seeds' spread: {', '.join(groups['better']) or 'none'}; "
            f"worse: {', '.join(groups['worse']) or 'none'}; within the spread: {', '.join(groups['within']) or 'none'}."
        )
    parts = []
    for bits in bits_list:
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


def write_section(text: str, path: Path = BENCHMARKS, section: str = SECTION) -> None:
    """Replace this study's section of BENCHMARKS.md (other sections belong to other studies)."""
    current = path.read_text() if path.is_file() else "# Benchmarks\n\nMeasured numbers, each with the machine and the exact command behind it.\n"
    start = current.find(f"\n{section}\n")
    if start < 0:
        updated = current.rstrip("\n") + "\n\n" + text
    else:
        end = current.find("\n## ", start + 1)
        updated = current[: start + 1] + text + ("\n" + current[end + 1:] if end >= 0 else "")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(updated)
    os.replace(tmp, path)


def study_command(args) -> str:
    """The command line that reproduces the study (every option that sets a number)."""
    protocol = getattr(args, "protocol", "scratch")
    options = [("seeds", args.seeds), ("epochs", args.epochs)]
    if PROTOCOLS[protocol].finetunes:
        options = [("protocol", protocol), *options, ("finetune-epochs", args.finetune_epochs)]
    options += [("width", args.width), ("threads", args.threads)]
    command = "python benchmarks/study.py " + " ".join(f"--{k} {v}" for k, v in options)
    if set(args.methods) != {m.key for m in PROTOCOLS[protocol].methods}:
        command += " --methods " + " ".join(args.methods)
    return command


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
    command = study_command(args)
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


def per_seed(runs: list[Run], results: list[dict]) -> dict:
    """``{(method key, bits): {seed: top1}}`` of the runs that finished."""
    values: dict = {}
    for run, result in zip(runs, results):
        if result["ok"]:
            values.setdefault((run.method.key, run.bits), {})[run.seed] = result["top1"]
    return values


def claims(table: dict, methods: list[Method], bits_list: tuple[int, ...]) -> list[str]:
    """One row per method: the paper's own ImageNet result beside what the study shows against
    direct fine-tuning at each bit-width, and a one-phrase verdict."""
    head = "| method | the paper's own result (ImageNet) | " + " | ".join(f"W{b}A{b} vs direct" for b in bits_list) + " | here |"
    rows = [head, "|---|---|" + "---:|" * len(bits_list) + "---|"]
    for m in methods:
        if m.key in ("fp", "direct"):
            continue
        cells, by_verdict = [], {"better": [], "worse": [], "within": []}
        for bits in bits_list:
            compared = versus_direct(table, m.key, bits)
            if compared is None:
                cells.append("-")
                continue
            delta, verdict, _ = compared
            cells.append(f"{delta:+.1f}" + {"better": " (beyond)", "worse": " (beyond)", "within": ""}[verdict])
            by_verdict[verdict].append(f"W{bits}A{bits}")
        parts = [f"{text} at {', '.join(by_verdict[key])}" for key, text in
                 (("better", "better than direct"), ("worse", "worse than direct"), ("within", "no difference beyond the spread"))
                 if by_verdict[key]]  # fmt: skip
        rows.append(f"| {m.label} | {PAPER_RESULTS.get(m.key, '')} | " + " | ".join(cells) + f" | {'; '.join(parts) or '-'} |")
    return rows


def duration(runs: list[Run], results: list[dict], elapsed: float) -> str:
    """How long the study took, saying which runs an earlier invocation trained (same command line)."""
    cached = sum(1 for r in results if r.get("cached"))
    if not cached:
        return f"the whole study took {elapsed / 60:.0f} min for {len(runs)} runs, one after the other."
    trained = sum(r["wall_s"] for r in results) / 60
    return (f"{len(runs)} runs, {cached} of them trained by an earlier invocation of the same command lines (their "
            f"results reused); training all of them took {trained:.0f} min of wall time, one after the other.")


def finetune_report(args, runs: list[Run], results: list[dict], started: datetime, elapsed: float, load: tuple) -> str:
    protocol = PROTOCOLS[args.protocol]
    bits_list = protocol.bits
    methods = [m for m in protocol.methods if m.key in args.methods]
    table = summarise(runs, results, bits_list)
    seeds = per_seed(runs, results)
    fp = table.get(("fp", bits_list[0]))
    tuned = [m for m in methods if m.uses_bits]
    head = "| method | recipe | " + " | ".join(f"W{b}A{b} top-1 % | CPU s" for b in bits_list) + " |"
    rows = [head, "|---|---|" + "---:|---:|" * len(bits_list)]
    for m in tuned:
        cells = []
        for b in bits_list:
            top1, _, cpu = fmt_cell(table.get((m.key, b)))
            cells += [top1, cpu]
        rows.append(f"| {m.label} | `{m.recipe}` | " + " | ".join(cells) + " |")
    seed_rows = ["| method | " + " | ".join(f"W{b}A{b}" for b in bits_list) + " |", "|---|" + "---|" * len(bits_list)]
    for m in methods:
        per_bits = [None] if not m.uses_bits else list(bits_list)
        texts = []
        for b in per_bits:
            values = seeds.get((m.key, b), {})
            texts.append(" / ".join(f"{values[s]:.2f}" if s in values else "-" for s in range(args.seeds)))
        if not m.uses_bits:
            texts = texts * len(bits_list)
        seed_rows.append(f"| {m.label} | " + " | ".join(texts) + " |")
    command = study_command(args)
    example = next((r for r in runs if r.method.key == "pq" and r.bits == 1), runs[-1])
    example_cmd = shlex.join(["python"] + example.command(args, Path("runs/study_finetune") / example.name)[1:]).replace(str(REPO_ROOT) + "/", "")
    fp_cmd = shlex.join(["python"] + runs[0].command(args, Path("runs/study_finetune") / runs[0].name)[1:]).replace(str(REPO_ROOT) + "/", "")
    failed = [f"{run.name}: {res['error']}" for run, res in zip(runs, results) if not res["ok"]]
    fp_text = (
        f"top-1 {fmt_cell(fp)[0]} %, {fmt_cell(fp)[2]} s CPU ({fmt_cell(fp)[1]} s wall) per seed"
        if fp else "not run in this study (its run directories were given)"
    )
    lines = [
        protocol.section,
        "",
        "The papers' protocol: every low-bit network starts from a trained full-precision one. Per seed, the "
        f"full-precision ResNet-18 (width {args.width}) is trained once on the embedded digits (`digits_fp.yaml`, "
        f"{args.epochs} epochs, the scratch study's settings), and every method fine-tunes from that checkpoint for "
        f"{args.finetune_epochs} epochs with its `digits_*_finetune.yaml` recipe, at "
        f"{', '.join(f'W{b}A{b}' for b in bits_list[:-1])} and W{bits_list[-1]}A{bits_list[-1]}, seeds "
        f"0..{args.seeds - 1}. Final val top-1 as mean ± sample std over the seeds; CPU time (user + system, process "
        "start to exit) per fine-tuning run, without the pretraining, which is counted once per seed below.",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC; {duration(runs, results, elapsed)}",
        f"- Code: {code_version()}.",
        f"- Machine: {machine()}; {args.threads} intra-op thread(s) per run, data.workers=0. "
        f"Load average {load[0]:.1f} before, {load[1]:.1f} after.",
        f"- Command: `{command}`",
        f"- Full-precision pretraining, once per seed: {fp_text}. Seed 0: `{fp_cmd}`",
        f"- Each fine-tuning run is `python -m distq train configs/RECIPE` with overrides; e.g. {example.method.label} at "
        f"W{example.bits}A{example.bits}, seed {example.seed}: `{example_cmd}`",
        "- Fine-tuning settings (`digits_w4a4_finetune.yaml`, which every other recipe starts from), after the authors' "
        "ImageNet fine-tuning recipe: SGD Nesterov, weight decay 1e-4, learning rate 5e-3 (1/20 of the full-precision "
        "0.1), divided by 10 at 1/2 and 5/6 of the run, no warm-up. Per method: TS quantizes activations after 0.5 of the "
        "run; PQ starts below the FP model's 32 bits, 8 -> 4 (W4A4), 8 -> 4 -> 2 (W2A2) or 4 -> 2 -> 1 (W1A1) in equal "
        "parts; SP ramps p from 0.5 to 1 over 0.8; guided: guide (lr 1e-3) and student (lr 5e-3) both from the FP model, "
        "the student's accuracy reported, the time covering both; the aux branch decays (cosine) to 0 at 0.5; cyclic "
        "goes 4 -> 3 -> 2 (-> 1) weight bits, one cycle of 0.067 fp + 0.133 lp per depth; AQE uses AdamW at lr 1e-3 "
        "(its ImageNet recipe's; AdamW's step does not scale with the gradient as SGD's does) with a cosine schedule and alpha 0.5 -> 1 at 0.9."
        + (QUANTIZER_SETTINGS if protocol.name == "quantizers" else ""),
        "",
        *rows,
        "",
        "Top-1 per seed (seeds 0 / 1 / ...), to compare a rerun with:",
        "",
        *seed_rows,
        "",
        "Reading (generated from the numbers above; a difference counts only when the means differ by more than the two "
        "standard deviations added):",
        "",
        *reading(table, methods, bits_list, direct="direct fine-tuning", fp="the full-precision start reaches"),
        "",
        "Each method against direct fine-tuning, beside its paper's own claim (all the papers report ImageNet, which "
        "cannot be run here; \"(beyond)\" marks a difference larger than the seeds' spread):",
        "",
        *claims(table, methods, bits_list),
        "",
        f"Caveats: {args.finetune_epochs} epochs of fine-tuning ({args.finetune_epochs * 22} SGD steps) of a width-"
        f"{args.width} network on an easy dataset; each method's schedule compressed into them and nothing tuned per "
        "method. The papers' claims are about ImageNet-sized problems and long schedules.",
    ]
    if failed:
        lines += ["", "Failed runs: " + "; ".join(failed)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="scratch",
                        help="scratch: every method from random weights; finetune: from a trained full-precision model")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6, help="epochs of a scratch run, and of the finetune protocol's FP pretraining")
    parser.add_argument("--finetune-epochs", type=int, default=4, help="finetune protocol: epochs of each fine-tuning run (at least 4)")
    parser.add_argument("--width", type=int, default=8, help="ResNet-18 base width (the recipes use 16)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--methods", nargs="+", choices=sorted({m.key for p in PROTOCOLS.values() for m in p.methods}),
                        help="the methods to run (default: all of the protocol's)")
    parser.add_argument("--runs-dir", help="where the runs go (default runs/study, or runs/study_finetune)")
    parser.add_argument("--fresh", action="store_true", help="train every run again even if its results are there")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    parser.add_argument("--benchmarks", help="the BENCHMARKS.md to update (default: the repository's, and only by a "
                        "study of all the protocol's methods)")
    args = parser.parse_args(argv)
    protocol = PROTOCOLS[args.protocol]
    known = [m.key for m in protocol.methods]
    args.methods = args.methods or known
    unknown = [k for k in args.methods if k not in known]
    if unknown:
        parser.error(f"--methods {' '.join(unknown)}: not in the {args.protocol} protocol (use {', '.join(known)})")
    if protocol.finetunes:
        if args.finetune_epochs < 4:
            parser.error("--finetune-epochs must be at least 4 (the learning rate decays at 1/2 and 5/6 of the run)")
        if "fp" not in args.methods:
            args.methods = ["fp", *args.methods]  # every fine-tuning run starts from its seed's FP run

    runs = plan_runs(args)
    runs_dir = Path(args.runs_dir or REPO_ROOT / "runs" / protocol.runs_dir)
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
    write_report = finetune_report if protocol.finetunes else report
    text = write_report(args, runs, results, started, elapsed, (load_before, os.getloadavg()[0]))
    (runs_dir / "study.md").write_text(text)
    partial = set(args.methods) != set(known)
    if args.no_write or (partial and args.benchmarks is None):
        print(text)
        if not args.no_write:
            print(f"(a study of some methods only: BENCHMARKS.md left as it is; --benchmarks PATH writes the section to PATH; "
                  f"this text is in {runs_dir / 'study.md'})", flush=True)
    else:
        path = Path(args.benchmarks or BENCHMARKS)
        write_section(text, path, protocol.section)
        print(f"wrote the '{protocol.section}' section of {path}", flush=True)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
