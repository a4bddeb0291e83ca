"""``distq plan``: the whole precision schedule of a config as a timeline, per epoch or per step.

Every value comes from the precision controller a training run builds (``PrecisionController``
without models), so the plan is what training does, not a second implementation of it.
"""

from __future__ import annotations

from pathlib import Path

from distq.config import DistqConfig
from distq.controller import Clock, PrecisionController
from distq.data.order import configured_layout
from distq.models.build import check_arch
from distq.models.team import roster
from distq.quant.functional import FULL_PRECISION

IMAGENET_TRAIN_IMAGES = 1_281_167


def count_train_images(cfg: DistqConfig) -> tuple[int, str]:
    """Training-set size for the step count: counted when the data is here, else ImageNet-1k's."""
    from distq.data import resolve_root
    from distq.data.folder import image_folder

    if cfg.data.format == "shards" and Path(cfg.data.root).is_dir():
        from distq.data.shards import ShardsFolder

        return int(ShardsFolder.open(cfg.data.root).splits["train"]["samples"]), "from index.json"
    if cfg.data.root is None or Path(cfg.data.root).is_dir():
        return len(image_folder(resolve_root(cfg.data), "train")), "counted"
    return IMAGENET_TRAIN_IMAGES, f"data.root {cfg.data.root} is not here: assuming ImageNet-1k's"


def _bits(bits: int) -> str:
    return "fp" if bits == FULL_PRECISION else str(bits)


def plan_lines(cfg: DistqConfig, train_images: int | None = None, world_size: int = 1, every_step: bool = False) -> list[str]:
    """The plan as text: a header, then one row per epoch (its first step), or per step."""
    check_arch(cfg.model.arch)
    note = "given"
    if train_images is None:
        train_images, note = count_train_images(cfg)
    steps_per_epoch = max(1, train_images // configured_layout(cfg, world_size).global_batch)
    clock = Clock(steps_per_epoch, steps_per_epoch * cfg.train.epochs)
    controller = PrecisionController(cfg, clock)

    members = roster(cfg)
    students = [m.name for m in controller.students]
    trains = "+".join(m.name for m in members)
    keep = [name for name, on in (("first conv", cfg.quant.keep_first_fp), ("last linear", cfg.quant.keep_last_fp),
                                  ("final activation", cfg.quant.keep_final_act_fp)) if on]
    names = ", ".join(p.__class__.__name__ for p in controller.policies) or "none (fixed precision)"
    guided = cfg.guided is not None
    lines = [
        f"{cfg.model.arch}, {cfg.train.epochs} epochs x {steps_per_epoch} steps ({train_images} train images {note}, "
        f"batch {cfg.data.batch_size} x {world_size} process(es))",
        f"policies: {names}",
        f"always full precision: {', '.join(keep) or 'nothing'}" + ("; guide: every layer" if guided else ""),
        "bits are weights/activations of the quantized layers; p: SP probability; f: aux-branch factor; alpha: AQE",
        "",
    ]
    first = ["step", "epoch"] if every_step else ["epoch"]
    header = first + ["stage", "phase"] + [f"{name} w/a" for name in students] + ["p", "f", "alpha", "trains"]
    steps = range(clock.total_steps) if every_step else range(0, clock.total_steps, steps_per_epoch)
    rows = []
    for step in steps:
        p = controller.precision_at(step)
        bits = controller.bits_at(step)
        where = [str(step), str(step // steps_per_epoch + 1)] if every_step else [str(step // steps_per_epoch + 1)]
        rows.append(
            where + [str(p.stage), p.phase]
            + [f"{_bits(bits[name][0])}/{_bits(bits[name][1])}" for name in students]
            + [f"{p.sp_p:.2f}", "-" if p.aux_f is None else f"{p.aux_f:.3f}", "-" if p.alpha is None else f"{p.alpha:.3f}", trains]
        )
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        lines.append("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    return lines
