"""The AQE estimator's training-time part (docs/methods.md, "AQE"): its mixing factor alpha rises
from alpha0 to 1 (when ``precision.aqe`` is given), and the latent weights of AQE layers are kept
in [-1, 1] after every update (whenever ``quant.method`` is aqe)."""

from __future__ import annotations

import torch

from distq.config import ConfigError
from distq.controller import schedules
from distq.controller.policies.base import Policy, Targets
from distq.controller.precision import Precision
from distq.controller.timeline import Clock
from distq.quant.layers import QConv2d, QLinear, quant_layers


class Aqe(Policy):
    key = "aqe"
    edits_weights = True  # the clip after every step

    @classmethod
    def configured(cls, cfg) -> bool:
        return cfg.precision.aqe is not None or cfg.quant.method == "aqe"

    def __init__(self, cfg, clock: Clock, targets: Targets):
        super().__init__(cfg, clock, targets)
        schedule = cfg.precision.aqe
        if schedule is not None and cfg.quant.method != "aqe":
            raise ConfigError(f"precision.aqe schedules AQE's alpha but quant.method={cfg.quant.method!r}: set quant.method=aqe")
        self.alpha0 = schedule.alpha0 if schedule else None
        self.end = clock.steps(schedule.end, "precision.aqe.end") if schedule else None

    def contribute(self, step: int, p: Precision) -> None:
        if self.alpha0 is not None:
            p.alpha = schedules.aqe_alpha(step, self.alpha0, self.end)

    def on_batch_start(self, step: int, p: Precision) -> None:
        if p.alpha is None:
            return
        for student in self.students:
            for _, layer in quant_layers(student.model):
                layer.alpha = p.alpha

    def on_after_step(self, step: int, p: Precision) -> None:
        with torch.no_grad():
            for student in self.students:
                for _, layer in quant_layers(student.model):
                    if isinstance(layer, (QConv2d, QLinear)) and layer.method == "aqe":
                        layer.weight.clamp_(-1.0, 1.0)

    def scalars(self, p: Precision) -> dict[str, float]:
        return {} if p.alpha is None else {"aqe/alpha": p.alpha}
