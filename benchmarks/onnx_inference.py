"""onnxruntime on distq's ONNX exports (FP32, W8A8, W4A4) against PyTorch float inference, on CPU.

    python benchmarks/onnx_inference.py [--arch resnet18] [--width 16] [--size 32] [--bits 32,8,4] [--threads 1] [--rounds 7]

Builds the model once per bit-width (random weights, batch-norm statistics like a trained
model's), exports it with ``distq.export.onnx_export.model_to_onnx`` (QCDQ, batch-norm
folded) and times, round-robin in this process:

- onnxruntime (CPU execution provider, graph optimisation ``ORT_ENABLE_ALL``, the default)
  on the export, batch 1 (latency) and batch 64 (throughput);
- PyTorch float inference of the same network with every quantizer off (eval mode,
  ``torch.inference_mode``), the same two batches.

Weights are random: the kernels do the same work whatever the values. Each export is first
checked against its fake-quantized PyTorch model (same top-1 on the batch). Replaces this
benchmark's section of BENCHMARKS.md unless ``--no-report``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn

from distq.export.onnx_export import model_to_onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from int_inference import full_precision  # noqa: E402
from int_inference import make_model as make_int_benchmark_model  # noqa: E402
from timing import REPO_ROOT, REPORT, context_lines, set_threads, time_interleaved, write_section  # noqa: E402

TITLE = "ONNX export in onnxruntime vs PyTorch float inference, CPU"
BATCHES = (1, 64)
OPTIMIZATION = "ORT_ENABLE_ALL"


def make_model(arch: str, width: int, size: int, bits: int) -> nn.Module:
    """int_inference.py's model: random weights, batch-norm statistics like a trained model's."""
    return make_int_benchmark_model(argparse.Namespace(arch=arch, width=width, image_size=size, method="dorefa"), bits)


def session(model: nn.Module, size: int, threads: int) -> ort.InferenceSession:
    classes = 1000 if size > 64 else 10  # as make_model builds it
    header = {
        "model": {"arch": "benchmark", "num_classes": classes},
        "preprocess": {"image_size": size, "val_crop_ratio": 1.0, "mean": [0.0] * 3, "std": [1.0] * 3},
        "classes": [str(i) for i in range(classes)],
    }
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model_to_onnx(model, header).SerializeToString(), options, providers=["CPUExecutionProvider"])


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        return sha + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--width", type=int, default=16, help="ResNet base width (the digits config: 16)")
    parser.add_argument("--size", type=int, default=32, help="image side (the digits: 32)")
    parser.add_argument("--bits", default="32,8,4", help="comma-separated k of each WkAk export (32: full precision)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of onnxruntime and torch")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds; medians are reported")
    parser.add_argument("--no-report", action="store_true", help="print only; do not write BENCHMARKS.md")
    parser.add_argument("--report", type=Path, default=REPORT, help="the markdown file whose section is replaced")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    threads = set_threads(args.threads)
    bits_list = [int(b) for b in args.bits.split(",")]
    generator = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, 3, args.size, args.size, generator=generator) for b in BATCHES}
    arrays = {b: x.numpy() for b, x in inputs.items()}
    variants = {}
    reference = full_precision(make_model(args.arch, args.width, args.size, 32))
    for batch in BATCHES:
        variants[f"torch|{batch}"] = lambda batch=batch: reference(inputs[batch])
    for bits in bits_list:
        model = make_model(args.arch, args.width, args.size, bits)
        sess = session(model, args.size, args.threads)
        got = sess.run(None, {"images": arrays[64]})[0]
        with torch.inference_mode():
            agree = float((got.argmax(1) == model(inputs[64]).numpy().argmax(1)).mean())
        print(f"W{bits}A{bits}: onnxruntime and the fake-quantized model agree on {agree:.0%} of the batch-64 images (random weights: near-tied logits)", flush=True)
        for batch in BATCHES:
            variants[f"{bits}|{batch}"] = lambda sess=sess, batch=batch: sess.run(None, {"images": arrays[batch]})
    with torch.inference_mode():
        timings = time_interleaved(variants, args.rounds, warmup=2, min_sample_s=0.2)

    def row(name: str, label: str) -> str:
        latency = {clock: 1e3 * timings.median(f"{name}|1", clock) for clock in ("cpu", "wall")}
        throughput = {clock: 64 / timings.median(f"{name}|64", clock) for clock in ("cpu", "wall")}
        vs = {b: timings.ratio(f"{name}|{b}", f"torch|{b}") for b in BATCHES}
        line = (
            f"| {label} | {latency['cpu']:.2f} ({latency['wall']:.2f}) | {throughput['cpu']:.0f} ({throughput['wall']:.0f}) | "
            f"{vs[1]:.2f}x | {vs[64]:.2f}x |"
        )
        print(line, flush=True)
        return line

    lines = [
        *context_lines(
            "python benchmarks/onnx_inference.py" + (f" --bits {args.bits}" if args.bits != "32,8,4" else "") + (f" --threads {args.threads}" if args.threads != 1 else ""),
            threads,
            load_before,
        ),
        f"- Commit: {commit()}; onnxruntime {ort.__version__} (CPU execution provider, graph optimisation {OPTIMIZATION}, "
        f"{args.threads} intra-op thread(s), 1 inter-op thread), numpy {np.__version__}.",
        f"- What: {args.arch} width {args.width}, {args.size}x{args.size} input, random weights (as benchmarks/int_inference.py); the ONNX exports "
        f"(QCDQ, batch-norm folded) of each bit-width in onnxruntime against PyTorch float inference of the same network "
        f"(eval, inference_mode). Latency: one image per call; throughput: batch 64. Medians of {args.rounds} interleaved "
        "rounds, CPU time of the process (wall time in brackets); ratios are medians of per-round ratios to PyTorch FP32 "
        "(time ratio: below 1 is faster than PyTorch).",
        "",
        "| model | latency, batch 1, ms | throughput, batch 64, images/s | time / PyTorch FP32, batch 1 | time / PyTorch FP32, batch 64 |",
        "|---|---:|---:|---:|---:|",
        row("torch", "PyTorch FP32 (float model)"),
    ]
    for bits in bits_list:
        lines.append(row(str(bits), "onnxruntime FP32 export" if bits == 32 else f"onnxruntime W{bits}A{bits} export"))
    lines += [
        "",
        "onnxruntime runs the FP32 export faster than PyTorch (fused Conv+ReLU kernels, less dispatch per op). It runs",
        "the quantized exports in float: each Conv/Gemm reads its dequantized weights and every quantized activation",
        "is a QuantizeLinear, Clip and DequantizeLinear pass over memory, so they cost more than the FP32 export, not",
        "less. Its integer kernels (QLinearConv) are kept out on purpose: the export puts a quantized layer's bias in",
        "a separate Add, because the fused kernel rounds the float bias (batch-norm shift) to the accumulator's unit",
        "and changes the model's outputs (README, ONNX export). No integer speed-up is claimed on this CPU.",
    ]
    if args.no_report:
        return
    print(f"wrote {write_section(TITLE, chr(10).join(lines) + chr(10), args.report)}")


if __name__ == "__main__":
    main()
