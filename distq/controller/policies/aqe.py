"""The AQE estimator's mixing factor alpha (docs/methods.md, "AQE"): it rises from alpha0 to 1
when ``precision.aqe`` is given. (The clip of AQE's latent weights after every update is the
method's own: ``distq.quant.methods.aqe``.)"""

from __future__ import annotations

from distq.config import ConfigError
from distq.controller import schedules
from distq.controller.policies.base import Policy, Targets
from distq.controller.precision import Precision
from distq.controller.timeline import Clock
from distq.quant.layers import quant_layers
from distq.quant.methods import method_class


class Aqe(Policy):
    key = "aqe"

    def __init__(self, cfg, clock: Clock, targets: Targets):
        super().__init__(cfg, clock, targets)
        schedule = cfg.precision.aqe
        if not method_class(cfg.quant.method).mixes_alpha:
            raise ConfigError(f"precision.aqe schedules AQE's alpha but quant.method={cfg.quant.method!r}: set quant.method=aqe")
        self.alpha0 = schedule.alpha0
        self.end = clock.steps(schedule.end, "precision.aqe.end")

    def contribute(self, step: int, p: Precision) -> None:
        p.alpha = schedules.aqe_alpha(step, self.alpha0, self.end)

    def on_batch_start(self, step: int, p: Precision) -> None:
        for student in self.students:
            for _, layer in quant_layers(student.model):
                layer.alpha = p.alpha

    def scalars(self, p: Precision) -> dict[str, float]:
        return {"aqe/alpha": p.alpha}
