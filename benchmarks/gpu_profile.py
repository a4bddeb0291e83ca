"""Where a training step spends its time on a GPU: kernels per step, GPU busy time, wall time.

    python benchmarks/gpu_profile.py [--variants FP,W4A4] [--batch 128] [--table FILE]

Needs a CUDA GPU: without one it says so and exits with status 2. Each variant is the step
of benchmarks/gpu_throughput.py (ResNet-50, bf16 autocast, channels-last, one synthetic
batch): 10 warm-up steps, 20 timed steps (wall time), then 5 steps under ``torch.profiler``.
Prints one line per variant: wall ms/step, kernels/step and GPU busy ms/step (the kernels'
own time, the profiler table's "Self CUDA time total" / 5). ``--table`` writes each
variant's profiler table (top 30 ops by GPU time) to FILE. Writes nothing to BENCHMARKS.md:
the figures there are copied from this output by hand.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_throughput import NO_GPU, make_step  # noqa: E402

PROFILED_STEPS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--variants", default="FP,W4A4")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--table", default=None, help="write the profiler tables to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(NO_GPU.replace("gpu_throughput.py", "gpu_profile.py"), file=sys.stderr)
        sys.exit(2)
    tables = []
    for variant in args.variants.split(","):
        step, device = make_step(variant, args.arch)
        images = torch.randn(args.batch, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
        labels = torch.randint(0, 1000, (args.batch,), device=device)
        for _ in range(10):
            step(images, labels)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            step(images, labels)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) / 20 * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(PROFILED_STEPS):
                step(images, labels)
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
        busy_ms = sum(e.self_device_time_total for e in kernels) / PROFILED_STEPS / 1e3
        launches = sum(e.count for e in kernels) / PROFILED_STEPS
        print(f"{variant}: wall {wall_ms:.1f} ms/step, {launches:.0f} kernels/step, GPU busy {busy_ms:.1f} ms/step", flush=True)
        tables.append(f"{variant}\n" + prof.key_averages().table(sort_by="self_device_time_total", row_limit=30))
        del step
        torch.cuda.empty_cache()
    if args.table:
        with open(args.table, "w") as out:
            out.write("\n\n".join(tables) + "\n")


if __name__ == "__main__":
    main()
