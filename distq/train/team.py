"""What a team of models trains against: the objective, and the features the hint loss reads."""

from __future__ import annotations

from distq.config import ConfigError, DistqConfig
from distq.distill.losses import CrossEntropy, MutualDistillation
from distq.models.team import GUIDE, Member, students


class FeatureTap:
    """Keeps the latest output of one named module of each model (for the hint loss)."""

    def __init__(self, team: list[Member], layer: str):
        self.features: dict = {}
        for member in team:
            try:
                module = member.model.get_submodule(layer)
            except AttributeError:
                raise ConfigError(f"guided.hint.layer={layer!r} is not a module of {member.model.__class__.__name__}: use e.g. layer3") from None
            module.register_forward_hook(self._store(member.name))

    def _store(self, name: str):
        def hook(module, inputs, output):
            self.features[name] = output

        return hook


def build_objective(cfg: DistqConfig, team: list[Member]):
    if cfg.guided is None:
        return CrossEntropy(cfg.train.label_smoothing)
    return MutualDistillation(cfg.guided, GUIDE, {m.name: m.a_bits for m in students(team)}, cfg.train.label_smoothing)
