"""The models a run trains: one model, or a full-precision guide with its low-precision students.

``Member`` is the one record of a model of the run, read by the trainer (learning rate), the
precision controller (target bits) and ``distq plan`` (names and bits; a plan builds no network).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch.nn as nn

from distq.config import DistqConfig
from distq.models.build import build_model, load_float_weights
from distq.quant.functional import FULL_PRECISION

GUIDE = "guide"
SINGLE = "model"


@dataclass
class Member:
    name: str
    w_bits: int
    """Target weight bit-width: the precision policies may raise it for a while, never lower it."""
    a_bits: int
    """Target activation bit-width."""
    lr: float
    model: nn.Module | None = None
    """The network; None in a roster (names and bits only)."""
    method: str | None = None
    """Its quantizer method; None: quant.method."""

    @property
    def is_guide(self) -> bool:
        return self.name == GUIDE


def roster(cfg: DistqConfig) -> list[Member]:
    """The run's models without their networks: the guide first, then the students."""
    if cfg.guided is None:
        return [Member(SINGLE, cfg.quant.w_bits, cfg.quant.a_bits, cfg.train.lr)]
    g = cfg.guided
    guide = Member(GUIDE, FULL_PRECISION, FULL_PRECISION, g.guide_lr or cfg.train.lr)
    return [guide] + [Member(s.name, s.w_bits, s.a_bits, g.student_lr or cfg.train.lr, method=s.method) for s in g.students]


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy parameters and BN statistics, but not the precision state (bits stay dst's)."""
    weights = {k: v for k, v in src.state_dict().items() if not k.endswith("_extra_state")}
    dst.load_state_dict(weights, strict=False)


def build_team(cfg: DistqConfig, num_classes: int) -> list[Member]:
    """The roster with its networks built (and the guide's pretrained weights loaded)."""
    team = []
    for member in roster(cfg):
        model = build_model(cfg.model, cfg.quant, num_classes, w_bits=member.w_bits, a_bits=member.a_bits, method=member.method)
        if member.is_guide and cfg.guided.guide_pretrained:
            load_float_weights(model, cfg.guided.guide_pretrained)
        if not member.is_guide and cfg.guided is not None and cfg.guided.students_from_guide:
            copy_weights(team[0].model, model)
        team.append(replace(member, model=model))
    return team


def main_model_name(team: list[Member]) -> str:
    """The model whose accuracy is the run's headline (val/top1): the first student."""
    return team[0].name if len(team) == 1 else team[1].name


def students(team: list[Member]) -> list[Member]:
    return [m for m in team if not m.is_guide]
