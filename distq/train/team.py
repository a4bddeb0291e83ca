"""The models a run trains: one model, or a full-precision guide with its students."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from distq.config import ConfigError, DistqConfig
from distq.controller.controller import Student
from distq.distill.losses import CrossEntropy, MutualDistillation
from distq.models.build import build_model, load_float_weights
from distq.quant.functional import FULL_PRECISION

GUIDE = "guide"
SINGLE = "model"


@dataclass
class Member:
    name: str
    model: nn.Module
    lr: float
    w_bits: int
    a_bits: int


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy parameters and BN statistics, but not the precision state (bits stay dst's)."""
    weights = {k: v for k, v in src.state_dict().items() if not k.endswith("_extra_state")}
    dst.load_state_dict(weights, strict=False)


def build_team(cfg: DistqConfig, num_classes: int) -> list[Member]:
    if cfg.guided is None:
        model = build_model(cfg.model, cfg.quant, num_classes)
        return [Member(SINGLE, model, cfg.train.lr, cfg.quant.w_bits, cfg.quant.a_bits)]
    g = cfg.guided
    guide = build_model(cfg.model, cfg.quant, num_classes, w_bits=FULL_PRECISION, a_bits=FULL_PRECISION)
    if g.guide_pretrained:
        load_float_weights(guide, g.guide_pretrained)
    team = [Member(GUIDE, guide, g.guide_lr or cfg.train.lr, FULL_PRECISION, FULL_PRECISION)]
    for s in g.students:
        student = build_model(cfg.model, cfg.quant, num_classes, w_bits=s.w_bits, a_bits=s.a_bits)
        if g.students_from_guide:
            copy_weights(guide, student)
        team.append(Member(s.name, student, g.student_lr or cfg.train.lr, s.w_bits, s.a_bits))
    return team


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


def main_model_name(team: list[Member]) -> str:
    """The model whose accuracy is the run's headline (val/top1): the first student."""
    return team[0].name if len(team) == 1 else team[1].name


def build_objective(cfg: DistqConfig, team: list[Member]):
    if cfg.guided is None:
        return CrossEntropy(cfg.train.label_smoothing)
    return MutualDistillation(cfg.guided, GUIDE, {m.name: m.a_bits for m in team[1:]}, cfg.train.label_smoothing)


def students_of(team: list[Member]) -> list[Student]:
    return [Student(m.name, m.model, m.w_bits, m.a_bits) for m in team if m.name != GUIDE]
