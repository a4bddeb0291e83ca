"""The auxiliary full-precision branch (docs/methods.md, "Auxiliary branch"): each quantized conv
gets a parallel float conv + BN, the layer computes ``LP(x) + f * FP(x)``, and f decays from 1
to 0, when the branches are removed.

The branches live outside the model (attached with forward hooks), so the model's own
parameters and state_dict never change: once f reaches 0 the hooks are removed and the network
is exactly the plain low-precision one, with nothing left to export.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from distq.config import ConfigError
from distq.controller import schedules
from distq.controller.policies.base import Policy, Targets
from distq.controller.precision import Precision
from distq.controller.timeline import Clock
from distq.models.team import Member
from distq.quant.layers import QConv2d

# The trained network must be exactly the low-precision one, so f must reach 0 while training.
AUX_END_WHY = "the branch is removed only once f reaches 0, so end it earlier, e.g. 0.5dur"


class AuxBranches(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.factor = 1.0
        self.branches = nn.ModuleDict()
        self._handles = []
        for name, layer in model.named_modules():
            if isinstance(layer, QConv2d):
                conv = nn.Conv2d(
                    layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                    layer.padding, layer.dilation, layer.groups, bias=False,
                )
                conv.weight.data.copy_(layer.weight.data)
                branch = nn.Sequential(conv, nn.BatchNorm2d(layer.out_channels))
                self.branches[name.replace(".", "__")] = branch
                self._handles.append(layer.register_forward_hook(self._hook(branch)))
        if not self._handles:
            raise ConfigError("precision.aux_branch: the model has no quantized convs to attach branches to")

    def _hook(self, branch: nn.Module):
        def add_branch(module, inputs, output):
            if self.factor == 0.0:
                return output
            if branch.training != module.training:  # follow the model's train/eval mode
                branch.train(module.training)
            return output + self.factor * branch(inputs[0])

        return add_branch

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def detach_from_model(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class AuxBranch(Policy):
    key = "aux_branch"

    def __init__(self, cfg, clock: Clock, targets: Targets):
        super().__init__(cfg, clock, targets)
        aux = cfg.precision.aux_branch
        self.decay = aux.decay
        self.start = clock.steps(aux.start, "precision.aux_branch.start")
        self.end = clock.steps(aux.end, "precision.aux_branch.end")
        if self.end >= clock.total_steps:
            raise ConfigError(f"precision.aux_branch.end={aux.end!r} must come before the end of the run ({clock.run()}): {AUX_END_WHY}")
        if self.end <= self.start:
            raise ConfigError(f"precision.aux_branch.end={aux.end!r} must come after precision.aux_branch.start={aux.start!r}")
        self.halve_every = max(1, clock.steps(aux.halve_every, "precision.aux_branch.halve_every"))
        self.branches: dict[str, AuxBranches] = {}
        self.removed = False
        self.listeners: list[Callable[[], None]] = []

    def contribute(self, step: int, p: Precision) -> None:
        if self.decay == "cosine":
            p.aux_f = schedules.aux_factor_cosine(step, self.start, self.end)
        else:
            p.aux_f = schedules.aux_factor_step(step, self.start, self.end, self.halve_every)

    def bind(self, students: list[Member]) -> None:
        super().bind(students)
        self.branches = {s.name: AuxBranches(s.model) for s in students}

    def on_batch_start(self, step: int, p: Precision) -> None:
        if self.removed:
            return
        for branches in self.branches.values():
            branches.factor = p.aux_f
        if p.aux_f == 0.0:
            self.remove()
            for listener in self.listeners:
                listener()

    def remove(self) -> None:
        for branches in self.branches.values():
            branches.detach_from_model()
        self.removed = True

    def scalars(self, p: Precision) -> dict[str, float]:
        return {"aux/f": p.aux_f}

    def state_dict(self) -> dict:
        state = {"aux_removed": self.removed}
        if not self.removed:
            state["aux"] = {name: b.state_dict() for name, b in self.branches.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("aux_removed") and not self.removed:
            self.remove()
        for name, branch_state in state.get("aux", {}).items():
            self.branches[name].load_state_dict(branch_state)
