"""What synchronised batch-norm costs: the training step with and without ``dist.sync_bn``,
2 processes on the CPU (gloo, DeepSpeed ZeRO-1), guided W4A4 on digits-sized images.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/sync_bn_cost.py [--rounds 20] [--width 16] [--batch 32] [--no-report]

Both variants are distq's own step (``Trainer.train_step``) of a trainer built from
``configs/digits_resnet18_w4a4_guided.yaml`` (FP guide + W4A4 student, ResNet-18 with 40
BatchNorm layers, 32x32 images), one with ``dist.sync_bn=true``; they run in the same
processes, round-robin, on one fixed batch per rank, with a barrier around every timed step.
Rank 0 reports the median step time of each and the median per-round ratio, and replaces this
benchmark's section of BENCHMARKS.md unless ``--no-report``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.timing import context_lines, time_interleaved, write_section  # noqa: E402
from distq.config import load_config  # noqa: E402
from distq.distributed import close_process_group  # noqa: E402
from distq.train.trainer import Trainer  # noqa: E402

TITLE = "SyncBN cost: guided W4A4 training step, 2 CPU processes"


def trainer(sync: bool, args, run_dir: Path) -> Trainer:
    cfg = load_config(
        REPO / "configs" / "digits_resnet18_w4a4_guided.yaml",
        [f"model.width={args.width}", f"data.batch_size={args.batch}", "data.workers=0", "log.tensorboard=false",
         "log.progress=false", f"dist.sync_bn={str(sync).lower()}", f"run.dir={run_dir}"],
    )  # fmt: skip
    built = Trainer(cfg)
    built.engine.team.train()
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32, help="images per process")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="distq-syncbn-bench-"))
    plain, synced = trainer(False, args, work / "plain"), trainer(True, args, work / "synced")
    generator = torch.Generator().manual_seed(int(os.environ.get("RANK", 0)))
    images = torch.randn(args.batch, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (args.batch,), generator=generator)
    timings = time_interleaved(
        {"plain BN": lambda: plain.train_step(images, labels), "SyncBN": lambda: synced.train_step(images, labels)},
        rounds=args.rounds,
        warmup=2,
        sync=plain.engine.barrier,
    )
    if plain.is_main:
        command = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} torchrun --nproc_per_node 2 benchmarks/sync_bn_cost.py --rounds {args.rounds} --width {args.width} --batch {args.batch}"
        plain_ms, synced_ms = (1e3 * timings.median(name, "wall") for name in ("plain BN", "SyncBN"))
        body = "\n".join(
            [
                *context_lines(command, int(os.environ.get("OMP_NUM_THREADS", 0)) or None, load_before),
                f"- Guided W4A4 (FP guide + W4A4 student), ResNet-18 width {args.width}, {args.batch} images of 32x32 per process,"
                f" 2 processes (gloo, DeepSpeed ZeRO-1); median of {args.rounds} interleaved rounds, wall clock.",
                "",
                "| step | ms | ratio to plain BN (median per round) |",
                "|---|---|---|",
                f"| plain BN | {plain_ms:.1f} | 1.00 |",
                f"| SyncBN | {synced_ms:.1f} | {timings.ratio('SyncBN', 'plain BN', 'wall'):.2f} |",
            ]
        )
        print(body)
        if not args.no_report:
            write_section(TITLE, body)
    close_process_group()


if __name__ == "__main__":
    main()
