"""The precision controller: owns every schedule and applies it to the low-precision models.

Its decisions are pure functions of (config, seed, step), so all data-parallel ranks
agree without communication and a resumed run repeats exactly what the uninterrupted
run did. The one piece of history, whether the auxiliary branches were removed, is
kept in ``state_dict()``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from distq.controller import schedules
from distq.controller.aux_branch import AuxBranches
from distq.controller.policies import AqeAlpha, AuxDecay, Event, Precision, Stochastic, build_policies
from distq.controller.timeline import Clock
from distq.controller.validate import target_bits
from distq.models.resnet import DistqBasicBlock, DistqBottleneck
from distq.quant.layers import QAct, QConv2d, QLinear, QuantState, quant_layers

BLOCK_TYPES = (DistqBasicBlock, DistqBottleneck)


@dataclasses.dataclass
class Student:
    """A low-precision model under the controller's command, with its target bits."""

    name: str
    model: nn.Module
    w_bits: int
    a_bits: int


def quant_units(model: nn.Module, unit: str) -> list[list[QuantState]]:
    """Groups of quantized layers that stochastic precision switches together:
    every residual block is one unit ("block"), or every layer ("layer"). Layers outside
    any block (e.g. the stem activation) are units of their own."""
    layers = list(quant_layers(model))
    if unit == "layer":
        return [[layer] for _, layer in layers]
    blocks = [name for name, m in model.named_modules() if isinstance(m, BLOCK_TYPES)]
    units: dict[str, list[QuantState]] = {}
    for name, layer in layers:
        owner = next((b for b in blocks if name.startswith(b + ".")), name)
        units.setdefault(owner, []).append(layer)
    return list(units.values())


class PrecisionController:
    def __init__(self, cfg, clock: Clock, students: list[Student]):
        self.seed = cfg.seed
        self.clock = clock
        self.students = students
        self.policies = build_policies(cfg, clock, target_bits(cfg)[0])
        self.stochastic = next((p for p in self.policies if isinstance(p, Stochastic)), None)
        self.uses_aqe = any(isinstance(p, AqeAlpha) for p in self.policies) or cfg.quant.method == "aqe"
        self.aux: dict[str, AuxBranches] = {}
        if any(isinstance(p, AuxDecay) for p in self.policies):
            self.aux = {s.name: AuxBranches(s.model) for s in students}
        self.aux_removed = False
        self.units = {s.name: quant_units(s.model, self.stochastic.unit) for s in students} if self.stochastic else {}
        self.current = self.precision_at(0)

    # --- pure ---------------------------------------------------------------------------

    def precision_at(self, step: int) -> Precision:
        precision = Precision()
        for policy in self.policies:
            policy.contribute(step, precision)
        return precision

    def sp_mask(self, step: int, num_units: int) -> torch.Tensor:
        return schedules.sp_mask(self.seed, step, num_units, self.precision_at(step).sp_p)

    # --- events -------------------------------------------------------------------------

    def on_event(self, event: Event, step: int, on_aux_removed=None) -> None:
        if event is Event.BATCH_START:
            self.apply(step, on_aux_removed)
        elif event is Event.AFTER_STEP and self.uses_aqe:
            self.clip_aqe_weights()
        elif event is Event.EPOCH_END:
            self.all_quantized()

    def apply(self, step: int, on_aux_removed=None) -> None:
        """Set every student's bits, SP subset, alpha and aux factor for ``step``."""
        p = self.current = self.precision_at(step)
        for student in self.students:
            w_bits = max(p.w_floor, student.w_bits)
            a_bits = max(p.a_floor, student.a_bits)
            for _, layer in quant_layers(student.model):
                layer.bits = a_bits if isinstance(layer, QAct) else w_bits
                layer.quantize = True
                if p.alpha is not None:
                    layer.alpha = p.alpha
            if self.stochastic is not None and p.sp_p < 1.0:
                units = self.units[student.name]
                for unit, quantized in zip(units, schedules.sp_mask(self.seed, step, len(units), p.sp_p).tolist()):
                    for layer in unit:
                        layer.quantize = quantized
        if self.aux and not self.aux_removed:
            for branches in self.aux.values():
                branches.factor = p.aux_f
            if p.aux_f == 0.0:
                self.remove_aux()
                if on_aux_removed is not None:
                    on_aux_removed()

    def all_quantized(self) -> None:
        """Every unit quantized (stochastic precision only samples during training steps)."""
        for student in self.students:
            for _, layer in quant_layers(student.model):
                layer.quantize = True

    def clip_aqe_weights(self) -> None:
        """AQE keeps latent weights in [-1, 1] after every update."""
        with torch.no_grad():
            for student in self.students:
                for _, layer in quant_layers(student.model):
                    if isinstance(layer, (QConv2d, QLinear)) and layer.method == "aqe":
                        layer.weight.clamp_(-1.0, 1.0)

    def remove_aux(self) -> None:
        for branches in self.aux.values():
            branches.detach_from_model()
        self.aux_removed = True

    # --- logging and checkpoints ----------------------------------------------------------

    def scalars(self) -> dict[str, float]:
        """The controller's state for TensorBoard, under policy-named tags."""
        p = self.current
        first = self.students[0]
        values = {
            "precision/w_bits": max(p.w_floor, first.w_bits),
            "precision/a_bits": max(p.a_floor, first.a_bits),
            "precision/stage": p.stage,
        }
        if len(self.students) > 1:
            for s in self.students:
                values[f"precision/w_bits/{s.name}"] = max(p.w_floor, s.w_bits)
                values[f"precision/a_bits/{s.name}"] = max(p.a_floor, s.a_bits)
        if self.stochastic is not None:
            values["precision/sp_p"] = p.sp_p
        if p.alpha is not None:
            values["aqe/alpha"] = p.alpha
        if p.aux_f is not None:
            values["aux/f"] = p.aux_f
        return values

    def aux_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {name: list(b.parameters()) for name, b in self.aux.items()} if not self.aux_removed else {}

    def state_dict(self) -> dict:
        state = {"precision": dataclasses.asdict(self.current), "aux_removed": self.aux_removed}
        if self.aux and not self.aux_removed:
            state["aux"] = {name: b.state_dict() for name, b in self.aux.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("aux_removed") and self.aux and not self.aux_removed:
            self.remove_aux()
        for name, branch_state in state.get("aux", {}).items():
            self.aux[name].load_state_dict(branch_state)
        self.current = Precision(**state["precision"])
