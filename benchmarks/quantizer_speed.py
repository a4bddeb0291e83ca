"""Quantizer forward+backward time against one elementwise op (clamp) on the same tensor.

    python benchmarks/quantizer_speed.py [--bits 4] [--batch 32] [--rounds 9] [--threads 1] [--compile]

For ResNet-50's weight shapes (64x64x3x3 .. 512x512x3x3, 2048x512x1x1) and activation
shapes (batch x 64x56x56 .. 2048x7x7), times one forward and one backward (the upstream
gradient given, ``x.grad`` cleared) of:

- ``clamp``: ``torch.clamp(x, 0, 1)`` with autograd's own backward: the baseline;
- ``relu``: ``torch.relu`` (one kernel each way), for scale;
- the k-bit DoReFa weight quantizer, per layer and per output channel, and the binary
  (k = 1) one, on the weight shapes; the k-bit activation quantizer on the activations.

All variants of one tensor are timed round-robin in this process; the figures are medians
over rounds of the per-round ratio to clamp. ``--compile`` adds ``torch.compile``d
quantizers (their first call, i.e. the compile time, is reported apart) and writes its own
section. Replaces this benchmark's section of BENCHMARKS.md unless ``--no-report``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from distq.quant.functional import act_quant, weight_quant

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import REPORT, context_lines, set_threads, time_interleaved, write_section  # noqa: E402

TITLE = "Quantizer speed: fused quantizers vs clamp"
TARGET = 2.0
WEIGHT_SHAPES = [(64, 64, 3, 3), (128, 128, 3, 3), (256, 256, 3, 3), (512, 512, 3, 3), (256, 1024, 1, 1), (2048, 512, 1, 1)]
ACT_SHAPES = [(64, 56, 56), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]


def forward_backward(fn, x: torch.Tensor, upstream: torch.Tensor):
    def run():
        x.grad = None
        fn(x).backward(upstream)

    return run


def quantizers(kind: str, bits: int) -> dict:
    if kind == "weight":
        return {
            f"W{bits}": lambda w: weight_quant(w, bits),
            f"W{bits} per-channel": lambda w: weight_quant(w, bits, per_channel=True),
            "W1 (binary)": lambda w: weight_quant(w, 1),
        }
    return {f"A{bits}": lambda x: act_quant(x, bits)}


def measure(kind: str, shape: tuple, bits: int, rounds: int, compile_: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    if kind == "weight":
        x = 0.05 * torch.randn(shape, generator=g)
    else:
        x = torch.randn(shape, generator=g) + 0.3  # a BN output: about half of it inside [0, 1]
    x.requires_grad_(True)
    upstream = torch.randn(shape, generator=g)
    fns = {"clamp": lambda v: torch.clamp(v, 0, 1), "relu": torch.relu, **quantizers(kind, bits)}
    compile_s = {}
    if compile_:
        for name, fn in list(quantizers(kind, bits).items()):
            compiled = torch.compile(fn)
            start = time.perf_counter()
            forward_backward(compiled, x, upstream)()
            compile_s[name] = time.perf_counter() - start
            fns[f"{name} compiled"] = compiled
    timings = time_interleaved({name: forward_backward(fn, x, upstream) for name, fn in fns.items()}, rounds, min_sample_s=0.05)
    return {
        "clamp_ms": {clock: 1e3 * timings.median("clamp", clock) for clock in ("cpu", "wall")},
        "ratios": {name: {clock: timings.ratio(name, "clamp", clock) for clock in ("cpu", "wall")} for name in fns if name != "clamp"},
        "compile_s": compile_s,
    }


def fmt_shape(shape: tuple) -> str:
    return "x".join(map(str, shape))


def table(rows: list[tuple[str, dict]], clock: str) -> list[str]:
    names = list(rows[0][1]["ratios"])
    lines = [
        "| tensor | clamp fwd+bwd (ms) | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for label, r in rows:
        lines.append(f"| {label} | {r['clamp_ms'][clock]:.2f} | " + " | ".join(f"{r['ratios'][n][clock]:.2f}x" for n in names) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, default=4, help="k of the k-bit quantizers (2..8)")
    parser.add_argument("--batch", type=int, default=32, help="batch of the activation tensors")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (after one warm-up call)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd quantizers (own section)")
    parser.add_argument("--quick", action="store_true", help="two small tensors, two rounds (a smoke test)")
    parser.add_argument("--no-report", action="store_true", help="print only; do not write BENCHMARKS.md")
    parser.add_argument("--report", type=Path, default=REPORT, help="the markdown file whose section is replaced")
    args = parser.parse_args()
    if not 2 <= args.bits <= 8:
        parser.error("--bits must be 2..8 (the binary weight quantizer is always included)")

    load_before = os.getloadavg()[0]
    threads = set_threads(args.threads)
    weight_shapes, act_shapes, rounds = WEIGHT_SHAPES, ACT_SHAPES, args.rounds
    if args.quick:
        weight_shapes, act_shapes, rounds = [(64, 64, 3, 3)], [(64, 8, 8)], 2
    results = {}
    for shape in weight_shapes:
        results[("weight", shape)] = measure("weight", shape, args.bits, rounds, args.compile)
        print(f"weight {fmt_shape(shape):>14s}", "  ".join(f"{n} {r['cpu']:.2f}x" for n, r in results[("weight", shape)]["ratios"].items()), flush=True)
    for shape in act_shapes:
        full = (args.batch, *shape)
        results[("act", full)] = measure("act", full, args.bits, rounds, args.compile)
        print(f"act {fmt_shape(full):>17s}", "  ".join(f"{n} {r['cpu']:.2f}x" for n, r in results[("act", full)]["ratios"].items()), flush=True)

    k = args.bits
    worst = {
        f"W{k}": max(r["ratios"][f"W{k}"]["cpu"] for (kind, _), r in results.items() if kind == "weight"),
        f"W{k} per-channel": max(r["ratios"][f"W{k} per-channel"]["cpu"] for (kind, _), r in results.items() if kind == "weight"),
        f"A{k}": max(r["ratios"][f"A{k}"]["cpu"] for (kind, _), r in results.items() if kind == "act"),
    }
    verdict = ", ".join(f"{name} {ratio:.2f}x ({'met' if ratio <= TARGET else 'MISSED'})" for name, ratio in worst.items())
    print(f"worst ratio to clamp (CPU time; target <= {TARGET}x): {verdict}")
    if args.no_report:
        return

    command = "python benchmarks/quantizer_speed.py" + "".join(
        f" {flag}" for flag, on in [(f"--bits {k}", k != 4), (f"--batch {args.batch}", args.batch != 32), (f"--rounds {args.rounds}", args.rounds != 9), (f"--threads {args.threads}", args.threads != 1), ("--compile", args.compile), ("--quick", args.quick)] if on
    )
    weight_rows = [(f"weight {fmt_shape(s)}", r) for (kind, s), r in results.items() if kind == "weight"]
    act_rows = [(f"activation {fmt_shape(s)}", r) for (kind, s), r in results.items() if kind == "act"]
    lines = [
        *context_lines(command, threads, load_before),
        f"- What: one forward + one backward (given upstream gradient) per call; ratios are the median over {rounds} "
        f"interleaved rounds of time / time of `torch.clamp(x, 0, 1)` forward+backward on the same tensor. Weights ~ N(0, 0.05^2); "
        f"activations ~ N(0.3, 1) at batch {args.batch}"
        + (" (full size: 32 is what the issue asks for)." if args.batch == 32 else " (scaled down from 32)."),
        "",
        "CPU time of the process (steadier on a busy machine):",
        "",
        *table(weight_rows, "cpu"),
        "",
        *table(act_rows, "cpu"),
        "",
        "Wall clock:",
        "",
        *table(weight_rows, "wall"),
        "",
        *table(act_rows, "wall"),
        "",
    ]
    if args.compile:
        lines += [
            "First call of each compiled quantizer (compile time included), seconds: "
            + "; ".join(f"{label} " + ", ".join(f"{n} {s:.1f}" for n, s in r["compile_s"].items()) for label, r in weight_rows + act_rows),
            "",
        ]
    lines += [f"Worst ratio to clamp over the shapes (CPU time), target <= {TARGET}x: {verdict}.", ""]
    print(f"wrote {write_section(TITLE + (' (torch.compile)' if args.compile else ''), chr(10).join(lines), args.report)}")


if __name__ == "__main__":
    main()
