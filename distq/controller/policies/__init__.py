"""The precision policies, one module each, in the order their contributions combine.

Adding a policy: its config dataclass in ``distq/config/precision.py`` (and a field of
``PrecisionConfig``), its module here, and its class in ``POLICIES``.
"""

from __future__ import annotations

from distq.config import ConfigError
from distq.controller.policies.aqe import Aqe
from distq.controller.policies.aux_branch import AuxBranch, AuxBranches
from distq.controller.policies.base import Policy, Targets
from distq.controller.policies.cyclic import Cyclic
from distq.controller.policies.progressive import Progressive
from distq.controller.policies.stochastic import Stochastic, quant_units
from distq.controller.policies.two_stage import TwoStage
from distq.controller.timeline import Clock

POLICIES: list[type[Policy]] = [Progressive, TwoStage, Cyclic, Stochastic, Aqe, AuxBranch]

__all__ = ["POLICIES", "Aqe", "AuxBranch", "AuxBranches", "Cyclic", "Policy", "Progressive", "Stochastic", "Targets",
           "TwoStage", "build_policies", "quant_units"]


def build_policies(cfg, clock: Clock, targets: Targets) -> list[Policy]:
    """The configured policies, each checked against the run and the others."""
    chosen = [cls for cls in POLICIES if cls.configured(cfg)]
    keys = {cls.key for cls in chosen}
    for cls in chosen:
        for other, why in cls.excludes.items():
            if other in keys:
                raise ConfigError(f"precision.{other} cannot be combined with precision.{cls.key} ({why}): remove one of them")
    return [cls(cfg, clock, targets) for cls in chosen]
