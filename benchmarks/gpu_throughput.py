"""ResNet-50 training throughput on a GPU: full precision, W4A4, W2A2, W1A1 and guided, bf16, channels-last.

    python benchmarks/gpu_throughput.py [--batch 128] [--steps 20] [--rounds 3] [--compile] [--kernels auto]
                                        [--data ROOT | --jpegs 5000] [--workers 8]

Needs a CUDA GPU: without one it says so and exits with status 2, measuring nothing.

Every variant trains through the trainer's own step (``distq.train.step.build_step`` on one
process, with the CUDA defaults: bf16 autocast, channels-last batches, the precision
controller's events, SGD over the team's parameter groups), exactly as ``distq train`` trains:

- ``FP``: the network at 32 bits (``quantize_model`` at full precision, as a guide is built);
- ``W4A4``, ``W2A2``, ``W1A1``: quantized weights and activations (first conv, last linear, final
  activation full precision), with the quantizer kernels of ``--kernels`` (``quant.kernels``;
  auto: the fused Triton kernels on CUDA);
- ``guided``: the full-precision guide with a W4A4 student and the mutual-distillation objective
  (images/s counts each image once, although two networks train on it); its target is 0.90x of
  its two members trained alone one after the other, 1 / (1/FP + 1/W4A4), reported beside it;
- ``guided2``: the guide with W4A4 and W2A2 students.

``--compile`` compiles every model as ``train.compile`` does (``distq.train.compiling``: CUDA graphs
on this one-process path).

Data: by default one fixed synthetic batch already on the GPU (the model's speed alone).
``--data ROOT`` (an ImageNet-layout folder) or ``--jpegs N`` (N generated photo-like JPEGs,
written once under the distq cache by ``benchmarks/data_loading.py``) feed the torchvision
training loader instead (224 px RandomResizedCrop + flip, ``--workers`` processes), so the
figure includes decoding. The variants run round-robin (``--steps`` timed steps each per
round, after warm-up); images/s is the median over rounds; peak GPU memory is measured per
variant over its warm-up. Replaces
this benchmark's section of BENCHMARKS.md unless ``--no-report``; ``--allow-cpu`` runs the
same code on the CPU as a smoke test and never writes the report.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from distq.config import config_from_dict
from distq.controller import Clock
from distq.data.order import BatchLayout
from distq.distributed.env import DistEnv
from distq.train.step import build_step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import REPORT, context_lines, write_section  # noqa: E402

TITLE = "GPU training throughput: ResNet-50 FP / W4A4 / guided"
NO_GPU = (
    "gpu_throughput.py needs a CUDA GPU, and none is visible here (torch.cuda.is_available() is False). "
    "Run it on a GPU machine; nothing was measured."
)
VARIANTS = {
    "FP": {"quant": {"w_bits": 32, "a_bits": 32}},
    "W4A4": {"quant": {"w_bits": 4, "a_bits": 4}},
    "W2A2": {"quant": {"w_bits": 2, "a_bits": 2}},
    "W1A1": {"quant": {"w_bits": 1, "a_bits": 1}},
    "guided": {"guided": {"students": [{"w_bits": 4, "a_bits": 4}]}},
    "guided2": {"guided": {"students": [{"w_bits": 4, "a_bits": 4}, {"w_bits": 2, "a_bits": 2}]}},
}


def make_step(variant: str, arch: str, kernels: str = "auto", compile_models_too: bool = False):
    """The trainer's step of one variant (``build_step``, one process); returns it and the engine's device."""
    quant = {**VARIANTS[variant].get("quant", {}), "kernels": kernels}
    cfg = config_from_dict(
        {
            "model": {"arch": arch},
            "train": {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4, "compile": compile_models_too},
            "dist": {"engine": "torch", "bf16": True},
            **VARIANTS[variant],
            "quant": quant,
        }
    )
    torch.manual_seed(0)
    step = build_step(cfg, 1000, Clock(1, 1), BatchLayout(cfg.data.batch_size), DistEnv())
    step.engine.team.train()

    def run(images, labels):
        step.start(0)
        losses = step(images, labels)
        step.finish(0)
        return losses

    return run, step.engine.device


def batches(args, device: torch.device):
    """An endless iterator of (images, labels): one synthetic batch on the device, or the loader's."""
    if args.data is None and args.jpegs is None:
        g = torch.Generator().manual_seed(0)
        images = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device, memory_format=torch.channels_last)
        labels = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
        while True:
            yield images, labels
    from distq.config.schema import DataConfig
    from distq.data import build_loaders

    root = args.data
    if root is None:
        from data_loading import ensure_dataset

        root = ensure_dataset(args.jpegs)
    bundle = build_loaders(DataConfig(root=str(root), loader="torchvision", image_size=args.size, batch_size=args.batch, workers=args.workers), seed=0)
    epoch = 0
    while True:
        bundle.start_epoch(epoch)
        for images, labels, _ in bundle.train:
            yield images, labels  # train_step moves them (channels-last on CUDA)
        epoch += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224, help="image side")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per variant first (cuDNN autotuning)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="FP,W4A4,W2A2,W1A1,guided")
    parser.add_argument("--kernels", choices=("auto", "torch", "triton"), default="auto", help="quant.kernels of the quantized variants")
    parser.add_argument("--compile", action="store_true", help="compile every model as train.compile does")
    parser.add_argument("--data", type=Path, default=None, help="ImageNet-layout folder for the torchvision loader")
    parser.add_argument("--jpegs", type=int, default=None, help="generate this many JPEGs and load them with torchvision")
    parser.add_argument("--workers", type=int, default=8, help="loader worker processes (with --data/--jpegs)")
    parser.add_argument("--allow-cpu", action="store_true", help="run even without a GPU: a smoke test of the code, never reported")
    parser.add_argument("--no-report", action="store_true", help="print only; do not write BENCHMARKS.md")
    parser.add_argument("--report", type=Path, default=REPORT, help="the markdown file whose section is replaced")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(NO_GPU, file=sys.stderr)
        sys.exit(2)
    on_gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    load_before = os.getloadavg()[0]
    names = args.variants.split(",")
    steps = {}
    for name in names:
        steps[name], device = make_step(name, args.arch, args.kernels, args.compile)
    data = batches(args, device)
    warmup_s, peak_gib = {}, {}
    for name, step in steps.items():
        sync()
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.warmup):
            step(*next(data))
        sync()
        warmup_s[name] = time.perf_counter() - start
        peak_gib[name] = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0
    rates = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[name](*next(data))
            sync()
            rates[name].append(args.steps * args.batch / (time.perf_counter() - start))
    images_s = {name: statistics.median(v) for name, v in rates.items()}
    for name in names:
        print(f"{name:8s} {images_s[name]:9.1f} images/s  (warm-up {warmup_s[name]:.1f} s)", flush=True)
    if "FP" in images_s:
        print("relative to FP:", ", ".join(f"{n} {images_s[n] / images_s['FP']:.2f}x" for n in names))
    members = 1 / (1 / images_s["FP"] + 1 / images_s["W4A4"]) if {"FP", "W4A4"} <= images_s.keys() else None
    if members and "guided" in images_s:
        print(f"guided vs its members trained alone (1 / (1/FP + 1/W4A4) = {members:.1f} images/s): {images_s['guided'] / members:.2f}x")
    if args.no_report or not on_gpu:
        return

    synthetic = args.data is None and args.jpegs is None
    title = TITLE + ("" if synthetic else ", torchvision loader")
    source = "one synthetic batch on the GPU" if synthetic else (
        f"torchvision loader, {args.workers} workers, " + (f"{args.jpegs} generated JPEGs" if args.data is None else f"folder {args.data}")
    )
    command = "python benchmarks/gpu_throughput.py " + " ".join(a for a in sys.argv[1:] if not a.startswith("--report"))
    lines = [
        *context_lines(command.strip(), None, load_before),
        f"- What: {args.arch}, batch {args.batch} at {args.size} px, bf16 autocast, channels-last, distq's train_step "
        f"(SGD); quantizer kernels {args.kernels}{', compiled (train.compile)' if args.compile else ''}; data: {source}; "
        f"{args.warmup} warm-up steps, then {args.rounds} interleaved rounds of {args.steps} steps; "
        f"median images/s. CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; peak GPU memory per variant "
        "over its warm-up (every variant's model stays allocated, so later rows include the earlier models' weights).",
        "",
        "| variant | images/s | vs FP | peak GiB | warm-up (s) |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {n} | {images_s[n]:.1f} | {images_s[n] / images_s['FP']:.2f}x | {peak_gib[n]:.1f} | {warmup_s[n]:.1f} |" if "FP" in images_s
            else f"| {n} | {images_s[n]:.1f} | | {peak_gib[n]:.1f} | {warmup_s[n]:.1f} |"
            for n in names
        ),
        "",
        *([f"guided vs its two members trained alone, 1 / (1/FP + 1/W4A4) = {members:.1f} images/s: "
           f"**{images_s['guided'] / members:.2f}x** (target >= 0.90x)", ""] if members and "guided" in images_s else []),
    ]
    print(f"wrote {write_section(title, chr(10).join(lines), args.report)}")


if __name__ == "__main__":
    main()
