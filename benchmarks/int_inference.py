"""Integer bit-operation engine vs PyTorch float inference of the same model, on CPU.

One command (from the repository root)::

    python benchmarks/int_inference.py

times, per bit-width (W1A1, W2A2, W4A4 by default), one batch through

- PyTorch FP32: the same network with every quantizer off (plain float convs),
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
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path; the median is reported")
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


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch allocations, lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def time_paths(args, bits: int, images: torch.Tensor) -> tuple[float, float, float, float]:
    """Seconds per batch of FP32, fake-quant and the integer engine, and the fraction of
    the batch on which the engine and the fake-quantized model predict the same class."""
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
        t_fp = median_seconds(lambda: fp(images), args.repeats)
        t_fq = median_seconds(lambda: model(images), args.repeats)
        t_int = median_seconds(lambda: engine(images), args.repeats)
        agree = (engine(images).argmax(1) == model(images).argmax(1)).float().mean().item()
    return t_fp, t_fq, t_int, agree


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    load_before = os.getloadavg()
    rows = []
    for bits in args.bits:
        t_fp, t_fq, t_int, agree = time_paths(args, bits, images)
        rows.append((bits, t_fp, t_fq, t_int, agree))
        print(
            f"W{bits}A{bits}: FP32 {t_fp * 1e3:8.1f} ms  fake-quant {t_fq * 1e3:8.1f} ms  integer engine {t_int * 1e3:9.1f} ms  "
            f"engine/FP32 {t_int / t_fp:6.1f}x  engine/fake-quant {t_int / t_fq:6.1f}x  (same top-1 on {agree:.0%} of the batch)",
            flush=True,
        )
    load_after = os.getloadavg()
    if not args.no_write:
        with open(args.out, "a") as f:
            f.write(section(args, argv, rows, load_before, load_after))
        print(f"appended to {args.out}")
    return 0


def section(args, argv, rows, load_before, load_after) -> str:
    command = "python benchmarks/int_inference.py" + (
        "" if not argv and len(sys.argv) < 2 else " " + " ".join(argv if argv is not None else sys.argv[1:])
    )
    lines = [
        "",
        f"## Integer engine vs PyTorch float inference, CPU ({datetime.date.today().isoformat()})",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} with {args.threads} intra-op threads; "
        f"load average {load_before[0]:.1f} before and {load_after[0]:.1f} after (other jobs shared the machine).",
        "",
        f"Model: {args.arch} width {args.width}, {args.image_size}x{args.image_size} input, batch {args.batch}, {args.method} quantizers, "
        f"random weights; median of {args.repeats} runs after a warm-up.",
        "",
        "| model | PyTorch FP32 ms/batch | PyTorch fake-quant ms/batch | integer engine ms/batch | engine / FP32 | engine / fake-quant |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for bits, t_fp, t_fq, t_int, _ in rows:
        lines.append(
            f"| W{bits}A{bits} | {t_fp * 1e3:.1f} | {t_fq * 1e3:.1f} | {t_int * 1e3:.1f} | {t_int / t_fp:.1f}x | {t_int / t_fq:.1f}x |"
        )
    lines += [
        "",
        "The integer engine is slower than PyTorch's float path here, and that is expected: its bit",
        "kernels are built from generic torch elementwise integer ops (AND/XOR, shifts, and a SWAR",
        "popcount of about a dozen ops per 32-bit word, since torch has no popcount), each a separate",
        "pass over memory, while the float convs run in oneDNN's fused, vectorised GEMM kernels. A",
        "k-bit x k-bit layer needs k^2 AND+popcount passes (bit-serial), so the cost grows with the",
        "square of the bit-width; W1A1 is the closest to float. The engine proves the integer",
        "arithmetic exact; a speed-up needs a fused popcount kernel (C++/CUDA, or hardware popcnt).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
