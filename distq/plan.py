"""``distq plan``: the whole precision schedule of a config as a per-epoch timeline."""

from __future__ import annotations

from pathlib import Path

from distq.config import DistqConfig
from distq.controller.policies import Precision, build_policies
from distq.controller.timeline import Clock
from distq.controller.validate import target_bits
from distq.data.order import configured_layout
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


def _bits(floor: int, target: int) -> str:
    bits = max(floor, target)
    return "fp" if bits == FULL_PRECISION else str(bits)


def plan_lines(cfg: DistqConfig, train_images: int | None = None, world_size: int = 1) -> list[str]:
    note = "given"
    if train_images is None:
        train_images, note = count_train_images(cfg)
    steps_per_epoch = max(1, train_images // configured_layout(cfg, world_size).global_batch)
    clock = Clock(steps_per_epoch, steps_per_epoch * cfg.train.epochs)
    policies = build_policies(cfg, clock, target_bits(cfg)[0])

    if cfg.guided is None:
        models = [("model", cfg.quant.w_bits, cfg.quant.a_bits)]
        guide = []
    else:
        models = [(s.name, s.w_bits, s.a_bits) for s in cfg.guided.students]
        guide = ["guide"]
    keep = [name for name, on in (("first conv", cfg.quant.keep_first_fp), ("last linear", cfg.quant.keep_last_fp),
                                  ("final activation", cfg.quant.keep_final_act_fp)) if on]
    names = ", ".join(p.__class__.__name__ for p in policies) or "none (fixed precision)"
    lines = [
        f"{cfg.model.arch}, {cfg.train.epochs} epochs x {steps_per_epoch} steps ({train_images} train images {note}, "
        f"batch {cfg.data.batch_size} x {world_size} process(es))",
        f"policies: {names}",
        f"always full precision: {', '.join(keep) or 'nothing'}" + ("; guide: every layer" if guide else ""),
        "bits are weights/activations of the quantized layers; p: SP probability; f: aux-branch factor; alpha: AQE",
        "",
    ]
    header = ["epoch", "stage", "phase"] + [f"{name} w/a" for name, _, _ in models] + ["p", "f", "alpha", "trains"]
    rows = []
    for epoch in range(cfg.train.epochs):
        p = Precision()
        for policy in policies:
            policy.contribute(epoch * steps_per_epoch, p)
        rows.append(
            [str(epoch + 1), str(p.stage), p.phase]
            + [f"{_bits(p.w_floor, w)}/{_bits(p.a_floor, a)}" for _, w, a in models]
            + [f"{p.sp_p:.2f}", "-" if p.aux_f is None else f"{p.aux_f:.3f}", "-" if p.alpha is None else f"{p.alpha:.3f}",
               "+".join(guide + [name for name, _, _ in models])]
        )
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        lines.append("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    return lines
