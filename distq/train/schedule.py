"""Learning-rate schedules as pure functions of the step (no hidden counters)."""

from __future__ import annotations

import math

from distq.config.schema import TrainConfig


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    epoch = step / steps_per_epoch
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return (step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    progress = (epoch - cfg.warmup_epochs) / (cfg.epochs - cfg.warmup_epochs)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
