"""Integer bit-operation engine vs PyTorch float inference of the same model, on CPU.

One command (from the repository root)::

    python benchmarks/int_inference.py

times, per bit-width (W1A1, W2A2, W4A4 by default), one batch through

- PyTorch FP32: the same network with every quantizer off (plain float convs, oneDNN),
- PyTorch fake-quant: the quantized model as training runs it (float convs + quantizers),
- the integer engine (``distq.infer``) on the exported model,

prints the times and ratios, and appends a section with the command, the machine and the
numbers to BENCHMARKS.md (``--no-write`` to skip). Weights are random: the bit kernels do
the same work whatever the values, so speed does not need a trained model.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distq.config.schema import ModelConfig, QuantConfig  # noqa: E402
from distq.export.exporter import export_model  # noqa: E402
from distq.infer.engine import build_engine  # noqa: E402
from distq.models.build import build_model  # noqa: E402
from distq.quant.layers import quant_layers  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4], help="k for each WkAk model (default: 1 2 4)")
    p.add_argument("--method", choices=("dorefa", "aqe"), default="dorefa")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=16, help="ResNet base width (the digits config: 16)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per path; the median is reported")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core machine two threads spin at every op's barrier)",
    )
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true", help="print only; do not append to BENCHMARKS.md")
    return p.parse_args(argv)


def make_model(args, bits: int) -> nn.Module:
    torch.manual_seed(0)
    model_cfg = ModelConfig(arch=args.arch, width=args.width, small_input=args.image_size <= 64)
    model = build_model(
        model_cfg, QuantConfig(w_bits=bits, a_bits=bits, method=args.method), 1000 if args.image_size > 64 else 10
    )
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


def interleaved_times(paths: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """{path: (median CPU seconds, median wall seconds)} per call.

    The paths take turns in every round, so a burst of load from other processes hits
    them alike, and the process's CPU time (one thread) counts only this process's work,
    which keeps the ratios steady on a shared machine where wall time is not.
    """
    for fn in paths.values():
        fn()  # warm-up: first-touch allocations, lazy initialisation
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    wall: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return {name: (statistics.median(cpu[name]), statistics.median(wall[name])) for name in paths}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def time_paths(args, bits: int, images: torch.Tensor) -> tuple[dict, float]:
    """CPU and wall seconds per batch of FP32, fake-quant and the integer engine, and the
    fraction of the batch on which the engine and the fake-quantized model agree."""
    model = make_model(args, bits)
    classes = model.fc.out_features
    header = {
        "model": {"arch": args.arch, "width": args.width, "small_input": args.image_size <= 64, "num_classes": classes},
        "preprocess": {"image_size": args.image_size},
        "classes": [str(i) for i in range(classes)],
    }
    engine = build_engine(export_model(model, header)[0])
    fp = full_precision(model)
    with torch.inference_mode():
        times = interleaved_times(
            {"fp32": lambda: fp(images), "fake": lambda: model(images), "int": lambda: engine(images)}, args.repeats
        )
        agree = (engine(images).argmax(1) == model(images).argmax(1)).float().mean().item()
    return times, agree


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    load_before = os.getloadavg()
    rows = []
    for bits in args.bits:
        times, agree = time_paths(args, bits, images)
        rows.append((bits, times, agree))
        (c_fp, w_fp), (c_fq, w_fq), (c_int, w_int) = times["fp32"], times["fake"], times["int"]
        print(
            f"W{bits}A{bits} CPU ms: FP32 {c_fp * 1e3:.1f}, fake-quant {c_fq * 1e3:.1f}, integer engine {c_int * 1e3:.1f}: "
            f"engine/FP32 {c_int / c_fp:.1f}x, engine/fake-quant {c_int / c_fq:.1f}x "
            f"(wall ms {w_fp * 1e3:.1f} / {w_fq * 1e3:.1f} / {w_int * 1e3:.1f}; same top-1 on {agree:.0%} of the batch)",
            flush=True,
        )
    load_after = os.getloadavg()
    if not args.no_write:
        with open(args.out, "a") as f:
            f.write(section(args, argv, rows, load_before, load_after))
        print(f"appended to {args.out}")
    return 0


def section(args, argv, rows, load_before, load_after) -> str:
    command = " ".join(["python benchmarks/int_inference.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        "",
        f"## Integer engine vs PyTorch float inference, CPU ({datetime.date.today().isoformat()})",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} with {args.threads} intra-op thread{'s' if args.threads != 1 else ''}; "
        f"load average {load_before[0]:.1f} before and {load_after[0]:.1f} after (other jobs shared the machine).",
        "",
        f"Model: {args.arch} width {args.width}, {args.image_size}x{args.image_size} input, batch {args.batch}, {args.method} quantizers, "
        f"random weights; median of {args.repeats} interleaved rounds after a warm-up.",
        "",
        "CPU time of the process per batch (steadier than wall time on a shared machine), wall time in brackets:",
        "",
        "| model | PyTorch FP32 ms | PyTorch fake-quant ms | integer engine ms | engine / FP32 | engine / fake-quant |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for bits, times, _ in rows:
        (c_fp, w_fp), (c_fq, w_fq), (c_int, w_int) = times["fp32"], times["fake"], times["int"]
        lines.append(
            f"| W{bits}A{bits} | {c_fp * 1e3:.0f} ({w_fp * 1e3:.0f}) | {c_fq * 1e3:.0f} ({w_fq * 1e3:.0f}) | "
            f"{c_int * 1e3:.0f} ({w_int * 1e3:.0f}) | {c_int / c_fp:.1f}x | {c_int / c_fq:.1f}x |"
        )
    lines += [
        "",
        "The integer engine is slower than PyTorch's float path, as expected: its bit kernels are",
        "generic torch elementwise integer ops (AND/XOR, and a SWAR popcount of about ten ops per",
        "32-bit word, since torch has no popcount op), each a separate pass over memory with its own",
        "dispatch, while PyTorch's float convs run in oneDNN's fused, vectorised kernels. A k-bit x",
        "k-bit layer costs k^2 AND+popcount passes (bit-serial), so the gap grows with the square of",
        "the bit-width and W1A1 comes closest. The engine's value is that its integer arithmetic is",
        "exact; a speed-up would need a fused popcount kernel (C++ with hardware popcnt, or CUDA).",
        "One intra-op thread: on this shared 2-core machine a second thread spends its time waiting",
        "at each op's barrier for a descheduled partner, which slowed both paths several-fold.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
