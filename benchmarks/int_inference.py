"""Integer bit-operation engine vs PyTorch float inference of the same model, on CPU.

One command (from the repository root) writes the BENCHMARKS.md section::

    python benchmarks/int_inference.py --suite

For each model (ResNet-18 at 224x224 with width 64, and the digits-sized ResNet-18: width
16, 32x32), batch (1 and 64) and bit-width (W1A1, W2A2, W4A4) it times one batch through

- PyTorch FP32: the same network with every quantizer off (plain float convs, oneDNN),
- the integer engine (``distq.infer``; its native bit kernels unless ``--kernels reference``)
  on the exported model,

round-robin in one process (``benchmarks/timing.py``). Then, per layer, the binary conv's
throughput (giga binary ops/s: an AND or XNOR and its popcount-accumulate count 2, like a
multiply-add's 2 flops, over every pair of bit planes) beside the float conv's GFLOP/s, and
where the engine's time goes: the bit GEMM (with its fused epilogue), packing and im2col,
the float first conv and last linear, everything else. Without ``--suite`` one
configuration runs (``--width``, ``--image-size``, ``--batch``, ``--bits``, ``--layers``).
Weights are random: the bit kernels do the same work whatever the values.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import REPORT, context_lines, set_threads, time_interleaved, write_section  # noqa: E402

from distq.config.schema import ModelConfig, QuantConfig  # noqa: E402
from distq.export.exporter import export_model  # noqa: E402
from distq.infer.engine import build_engine  # noqa: E402
from distq.infer.layers import BitConv2d, FloatLayer  # noqa: E402
from distq.infer.native.ops import KernelTimes  # noqa: E402
from distq.models.build import build_model  # noqa: E402
from distq.quant.layers import QConv2d, quant_layers  # noqa: E402

TITLE = "Integer engine vs PyTorch float inference, CPU"
TARGETS = {1: 2.0, 2: 1.0}
"""Issue #17's targets, engine speed-up over FP32 (W4A4 is reported only); the moonshot is 5x at W1A1."""
CPU_FLAGS = ("popcnt", "avx2", "avx512f", "avx512bw", "avx512_vpopcntdq")
"""The instruction sets the native kernels dispatch on, as /proc/cpuinfo spells them."""


@dataclass(frozen=True)
class Setup:
    width: int
    image_size: int
    batch: int
    layers: bool = False  # also the per-layer table and the time breakdown

    @property
    def name(self) -> str:
        return f"ResNet-18 w{self.width} {self.image_size}px"


SUITE = [Setup(64, 224, 1, layers=True), Setup(64, 224, 64), Setup(16, 32, 1), Setup(16, 32, 64, layers=True)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", action="store_true", help="the BENCHMARKS.md grid: both models, batch 1 and 64, W1A1/W2A2/W4A4")
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4], help="k for each WkAk model (default: 1 2 4)")
    p.add_argument("--method", choices=("dorefa", "aqe"), default="dorefa")
    p.add_argument("--width", type=int, default=16, help="ResNet base width (the digits config: 16)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--layers", action="store_true", help="also the per-layer table and the time breakdown")
    p.add_argument("--kernels", choices=("native", "reference"), default="native", help="the engine's bit kernels")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per variant (default: 21 at batch 1, 5 above)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads, for both paths (default 1: on a shared 2-core machine two threads spin at every op's barrier)",
    )
    p.add_argument("--out", default=str(REPORT))
    p.add_argument("--no-write", action="store_true", help="print only; do not write the BENCHMARKS.md section")
    return p.parse_args(argv)


def make_model(setup: Setup, bits: int, method: str) -> nn.Module:
    torch.manual_seed(0)
    small = setup.image_size <= 64
    model_cfg = ModelConfig(arch="resnet18", width=setup.width, small_input=small)
    model = build_model(model_cfg, QuantConfig(w_bits=bits, a_bits=bits, method=method), 10 if small else 1000)
    for m in model.modules():  # statistics like a trained model's, so activations use every level
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(0.2, 0.6)
    for _, layer in quant_layers(model):
        layer.alpha = 1.0
    return model.eval()


def full_precision(model: nn.Module) -> nn.Module:
    fp = copy.deepcopy(model)
    for _, layer in quant_layers(fp):
        layer.bits = 32
    return fp


def engine_for(model: nn.Module, setup: Setup, kernels: str):
    classes = model.fc.out_features
    header = {
        "model": {"arch": "resnet18", "width": setup.width, "small_input": setup.image_size <= 64, "num_classes": classes},
        "preprocess": {"image_size": setup.image_size},
        "classes": [str(i) for i in range(classes)],
    }
    return build_engine(export_model(model, header)[0], kernels=kernels)


@dataclass
class Result:
    setup: Setup
    bits: int
    fp32_ms: float
    engine_ms: float
    speedup: float  # median over rounds of FP32 time / engine time
    layers: list | None = None  # per-layer rows
    breakdown: dict | None = None
    clock: str = "cpu"


def run_setup(setup: Setup, args, images: torch.Tensor, fp_models: dict) -> list[Result]:
    results = []
    for bits in args.bits:
        model = make_model(setup, bits, args.method)
        engine = engine_for(model, setup, args.kernels)
        fp = fp_models.setdefault(setup, full_precision(model))  # the same float network at every bit-width
        rounds = args.rounds or (21 if setup.batch == 1 else 5)
        clock = "cpu" if args.threads == 1 else "wall"  # several threads: CPU time sums them
        with torch.inference_mode():
            variants = {"fp32": lambda fp=fp: fp(images), "engine": lambda engine=engine: engine(images)}
            timings = time_interleaved(variants, rounds)
            result = Result(
                setup,
                bits,
                timings.median("fp32", clock) * 1e3,
                timings.median("engine", clock) * 1e3,
                1.0 / timings.ratio("engine", "fp32", clock),
                clock=clock,
            )
            if setup.layers:
                result.layers = layer_rows(engine, fp, images, bits)
                result.breakdown = breakdown(engine, images) if args.kernels == "native" else None
        print(
            f"{setup.name} batch {setup.batch} W{bits}A{bits}: FP32 {result.fp32_ms:.2f} ms, engine {result.engine_ms:.2f} ms "
            f"({engine.kernels}): {result.speedup:.2f}x FP32",
            flush=True,
        )
        results.append(result)
    return results


def module_times(net: nn.Module, kinds, run, rounds: int = 5) -> dict[str, float]:
    """Median CPU seconds per call of every module of ``kinds`` over ``rounds`` calls of run()."""
    times: dict[str, list[float]] = {}
    handles = []
    for name, m in net.named_modules():
        if isinstance(m, kinds):
            handles.append(m.register_forward_pre_hook(lambda m, i: setattr(m, "_t0", time.process_time())))
            handles.append(
                m.register_forward_hook(lambda m, i, o, name=name: times.setdefault(name, []).append(time.process_time() - m._t0))
            )
    try:
        run()
        times.clear()
        for _ in range(rounds):
            run()
    finally:
        for h in handles:
            h.remove()
    return {name: statistics.median(ts) for name, ts in times.items()}


def layer_rows(engine, fp: nn.Module, images: torch.Tensor, bits: int) -> list[dict]:
    """Per quantized conv: its shape, multiply-adds, and the seconds of the float and the bit conv."""
    shapes = {}

    def record(name):
        def hook(m, i, o):
            shapes[name] = (tuple(i[0].shape), tuple(o.shape))

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in fp.named_modules() if isinstance(m, QConv2d)]
    fp(images)
    for h in handles:
        h.remove()
    float_s = module_times(fp, QConv2d, lambda: fp(images))
    bit_s = module_times(engine.net, BitConv2d, lambda: engine(images))
    rows = []
    for name, (inp, out) in shapes.items():
        conv = fp.get_submodule(name)
        kh, kw = conv.kernel_size
        macs = out[0] * out[2] * out[3] * out[1] * inp[1] * kh * kw
        rows.append(
            {
                "name": name,
                "shape": f"{inp[1]}→{out[1]} {kh}x{kw}/{conv.stride[0]}, {out[2]}x{out[3]}",
                "macs": macs,
                "float_s": float_s[name],
                "bit_s": {bits: bit_s[name]},
            }
        )
    return rows


def breakdown(engine, images: torch.Tensor, rounds: int = 5) -> dict[str, float]:
    """Fractions of the engine's CPU time per batch: bit GEMM (with its fused epilogue),
    packing + im2col, the float first conv and last linear, and the rest."""
    first_last = module_times(engine.net, FloatLayer, lambda: engine(images), rounds)
    engine(images)
    with KernelTimes() as kernels:
        start = time.process_time()
        for _ in range(rounds):
            engine(images)
        total = (time.process_time() - start) / rounds
    parts = {
        "bit GEMM": kernels.seconds["gemm"] / rounds,
        "packing + im2col": (kernels.seconds["packing"] + kernels.seconds["im2col"]) / rounds,
        "first conv + last linear (float)": sum(first_last.values()),
    }
    parts["other (pooling, Python, ...)"] = max(0.0, total - sum(parts.values()))
    return {"total_s": total, **{k: v / total for k, v in parts.items()}}


# --- the report -------------------------------------------------------------------------


def commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU", []
    name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), []))
    return name, [f for f in CPU_FLAGS if f in flags]


def section(args, argv, results: list[Result], load_before: float, kernels: str) -> str:
    command = " ".join(["python benchmarks/int_inference.py", *(sys.argv[1:] if argv is None else argv)])
    cpu, flags = cpu_model_and_flags()
    clock = results[0].clock
    lines = [
        *context_lines(command, args.threads, load_before),
        f"- CPU: {cpu}; flags the kernels dispatch on: {', '.join(flags) or 'none'}; engine kernels: {kernels}.",
        f"- Code: commit {commit()}.",
        f"- Method: {args.method} quantizers, random weights, batch-norm statistics spread like a trained model's; "
        f"each batch timed round-robin against FP32 ({'CPU' if clock == 'cpu' else 'wall'} time, median over rounds; "
        "the speed-up is the median of the per-round ratios).",
        "",
        "Speed-up of the integer engine over PyTorch FP32 inference of the same network (higher is better; "
        "targets: W1A1 >= 2x, moonshot 5x; W2A2 >= 1x; W4A4 reported):",
        "",
        "| model | batch | FP32 ms | " + " | ".join(f"W{b}A{b} ms | W{b}A{b} speed-up" for b in args.bits) + " |",
        "|---|---:|---:|" + "---:|---:|" * len(args.bits),
    ]
    by_setup: dict[Setup, list[Result]] = {}
    for r in results:
        by_setup.setdefault(r.setup, []).append(r)
    for setup, rs in by_setup.items():
        fp32 = statistics.median(r.fp32_ms for r in rs)
        cells = []
        for r in rs:
            target = TARGETS.get(r.bits)
            mark = "" if target is None else (" ✓" if r.speedup >= target else f" ✗ (target {target:g}x)")
            cells.append(f"{r.engine_ms:.1f} | **{r.speedup:.2f}x**{mark}")
        lines.append(f"| {setup.name} | {setup.batch} | {fp32:.1f} | " + " | ".join(cells) + " |")
    for setup, rs in by_setup.items():
        if not rs[0].layers:
            continue
        lines += layer_table(setup, rs)
    return "\n".join(lines) + "\n"


def layer_table(setup: Setup, rs: list[Result]) -> list[str]:
    bits = [r.bits for r in rs]
    lines = [
        "",
        f"Per layer, {setup.name}, batch {setup.batch}: the float conv's GFLOP/s (PyTorch FP32) beside the bit conv's "
        "giga binary ops/s (2 per AND/XNOR + popcount-accumulate, over every pair of bit planes: a W2A2 multiply-add "
        "is 4 binary multiply-adds). A bit conv's time includes what is fused into it (its affine, and where a "
        "DoReFa activation follows, the residual add and that activation).",
        "",
        "| layer | shape | MMAC | FP32 GFLOP/s | " + " | ".join(f"W{b}A{b} GBOP/s" for b in bits) + " |",
        "|---|---|---:|---:|" + "---:|" * len(bits),
    ]
    for i, row in enumerate(rs[0].layers):
        float_s = statistics.median(r.layers[i]["float_s"] for r in rs)
        cells = [f"{2 * row['macs'] * b * b / r.layers[i]['bit_s'][b] / 1e9:.0f}" for r, b in zip(rs, bits)]
        lines.append(f"| {row['name']} | {row['shape']} | {row['macs'] / 1e6:.1f} | {2 * row['macs'] / float_s / 1e9:.1f} | " + " | ".join(cells) + " |")
    if any(r.breakdown for r in rs):
        parts = [k for k in rs[0].breakdown if k != "total_s"]
        lines += [
            "",
            f"Where the engine's time goes, {setup.name}, batch {setup.batch} (share of its CPU time per batch):",
            "",
            "| model | engine ms | " + " | ".join(parts) + " |",
            "|---|---:|" + "---:|" * len(parts),
        ]
        for r in rs:
            b = r.breakdown
            lines.append(f"| W{r.bits}A{r.bits} | {b['total_s'] * 1e3:.1f} | " + " | ".join(f"{b[p]:.0%}" for p in parts) + " |")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    setups = SUITE if args.suite else [Setup(args.width, args.image_size, args.batch, args.layers)]
    load_before = os.getloadavg()[0]
    results, fp_models = [], {}
    for setup in setups:
        size = setup.image_size
        images = torch.randn(setup.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        results += run_setup(setup, args, images, fp_models)
        fp_models.clear()
    from distq.infer.native import describe

    kernels = describe() if args.kernels == "native" else "reference"
    text = section(args, argv, results, load_before, kernels)
    print(text)
    if not args.no_write:
        print(f"wrote {write_section(TITLE, text, Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
