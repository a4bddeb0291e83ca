"""A guided step (full-precision guide + two students) against the three models' separate steps.

    python benchmarks/guided_step.py [--arch resnet18] [--batch 8] [--size 224] [--rounds 5] [--threads 1]

The guided step is distq's own: the trainer's step as ``distq.train.step.build_step`` assembles
it for a guided config on one process (team, mutual-distillation objective, precision controller
and its events, one optimizer over all parameter groups, the engine): a full-precision guide and
W4A4 and W2A2 students, students initialised from the guide. The
baseline is the same three networks stepped separately, each with its own optimizer and
plain cross-entropy; the target is guided <= 1.05x the sum of the three. Both are timed
round-robin in this process on one fixed random batch; the ratio is the median over rounds
of the per-round ratio. Replaces this benchmark's section of BENCHMARKS.md unless
``--no-report``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from distq.config import config_from_dict
from distq.controller import Clock
from distq.data.order import BatchLayout
from distq.distributed.env import DistEnv
from distq.models.team import build_team
from distq.train.optim import build_optimizer, param_groups
from distq.train.step import build_step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import REPORT, context_lines, set_threads, time_interleaved, write_section  # noqa: E402

TITLE = "Guided step: guide + two students vs three separate steps"
TARGET = 1.05
STUDENTS = [{"w_bits": 4, "a_bits": 4}, {"w_bits": 2, "a_bits": 2}]


def guided_config(arch: str):
    return config_from_dict(
        {
            "model": {"arch": arch},
            "train": {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
            "dist": {"engine": "torch"},
            "guided": {"students": STUDENTS},
        }
    )


def guided_train_step(cfg, classes: int, batch: int):
    """The trainer's step of a guided config (``build_step``), on one process, without data loaders,
    from the weights a run of ``cfg`` starts from."""
    torch.manual_seed(cfg.seed)
    step = build_step(cfg, classes, Clock(1, 1), BatchLayout(batch), DistEnv())
    step.engine.team.train()
    return step


def guided_step(cfg, classes: int, images: torch.Tensor, labels: torch.Tensor):
    step = guided_train_step(cfg, classes, images.shape[0])

    def run():
        step.start(0)
        step(images, labels)
        step.finish(0)

    return run


def separate_steps(cfg, classes: int, images: torch.Tensor, labels: torch.Tensor):
    """The same three networks, each with its own optimizer and cross-entropy, one after another."""
    torch.manual_seed(0)
    team = build_team(cfg, classes)
    steps = []
    for member in team:
        model = member.model.train()
        optimizer = build_optimizer(param_groups(model, member.lr, cfg.train.weight_decay, member.name), cfg.train)
        steps.append((model, optimizer))

    def run():
        for model, optimizer in steps:
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="image side")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (0: torch's default)")
    parser.add_argument("--no-report", action="store_true", help="print only; do not write BENCHMARKS.md")
    parser.add_argument("--report", type=Path, default=REPORT, help="the markdown file whose section is replaced")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    threads = set_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    labels = torch.randint(0, args.classes, (args.batch,), generator=generator)
    cfg = guided_config(args.arch)
    timings = time_interleaved(
        {"guided": guided_step(cfg, args.classes, images, labels), "separate": separate_steps(cfg, args.classes, images, labels)}, args.rounds
    )
    ratio = {clock: timings.ratio("guided", "separate", clock) for clock in ("cpu", "wall")}
    verdict = f"{ratio['cpu']:.3f}x ({'met' if ratio['cpu'] <= TARGET else 'MISSED'})"
    print(
        f"{args.arch}: guided {timings.median('guided'):.3f} s, separate {timings.median('separate'):.3f} s (CPU time); "
        f"guided / separate {verdict}, wall {ratio['wall']:.3f}x (target <= {TARGET}x)"
    )
    if args.no_report:
        return

    defaults = {"arch": "resnet18", "batch": 8, "size": 224, "classes": 1000, "rounds": 5, "threads": 1}
    command = "python benchmarks/guided_step.py" + "".join(f" --{k} {getattr(args, k)}" for k, v in defaults.items() if getattr(args, k) != v)
    students = " and ".join(f"W{s['w_bits']}A{s['a_bits']}" for s in STUDENTS)
    lines = [
        *context_lines(command, threads, load_before),
        f"- What: {args.arch}, full-precision guide + {students} students, one fixed random batch of {args.batch} images "
        f"{args.size}x{args.size}, {args.classes} classes. Guided: the trainer's step (`build_step`: one forward of each model, "
        f"MutualDistillation losses, one backward of their sum, one SGD step over all parameters). Separate: each network "
        f"alone, cross-entropy, its own SGD step, one after another. Median over {args.rounds} interleaved rounds of the "
        f"per-round ratio.",
        "",
        "| variant | CPU s / step | wall s / step |",
        "|---|---:|---:|",
        f"| guided (3 models) | {timings.median('guided'):.3f} | {timings.median('guided', 'wall'):.3f} |",
        f"| separate (sum of 3) | {timings.median('separate'):.3f} | {timings.median('separate', 'wall'):.3f} |",
        "",
        f"Guided / separate, target <= {TARGET}x: **{verdict}** in CPU time; {ratio['wall']:.3f}x wall clock.",
        "",
    ]
    print(f"wrote {write_section(TITLE, chr(10).join(lines), args.report)}")


if __name__ == "__main__":
    main()
