"""The precision controller: combines its policies' decisions into every student's bits and
drives the students' models from the training loop's events.

Its decisions are pure functions of (config, seed, step), so all data-parallel ranks agree
without communication, a resumed run repeats exactly what the uninterrupted run did, and
``distq plan`` prints what training will do by asking the same object. The one piece of
history, whether the auxiliary branches were removed, is kept in ``state_dict()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn as nn

from distq.controller.events import Event
from distq.controller.policies import AuxBranch, AuxBranches, Targets, build_policies
from distq.controller.precision import Precision
from distq.controller.timeline import Clock
from distq.models.team import Member, roster, students
from distq.quant.layers import QAct, quant_layers


class PrecisionController:
    def __init__(self, cfg, clock: Clock, team: list[Member] | None = None):
        """``team``: the run's members with their models, which the controller then drives;
        None for a plan, which only asks what happens at each step."""
        self.clock = clock
        self.students = students(team if team is not None else roster(cfg))
        targets = Targets(
            min(s.w_bits for s in self.students),
            min(s.a_bits for s in self.students),
            "guided.students" if cfg.guided is not None else "quant",
        )
        self.policies = build_policies(cfg, clock, targets)
        self.drives_models = team is not None
        self.method_edits = []
        """The students' layers whose quantizer method edits weights after each update (AQE's clip)."""
        if self.drives_models:
            for policy in self.policies:
                policy.bind(self.students)
            self.method_edits = [layer for s in self.students for _, layer in quant_layers(s.model) if layer.quantizer.edits_weights]
        self.current = self.precision_at(0)

    # --- decisions (pure) -----------------------------------------------------------------

    def precision_at(self, step: int) -> Precision:
        precision = Precision()
        for policy in self.policies:
            policy.contribute(step, precision)
        return precision

    def bits_at(self, step: int) -> dict[str, tuple[int, int]]:
        """Every student's (weight, activation) bits at ``step``."""
        p = self.precision_at(step)
        return {s.name: p.bits(s.w_bits, s.a_bits) for s in self.students}

    # --- events ---------------------------------------------------------------------------

    def on_event(self, event: Event, step: int) -> None:
        if not self.drives_models:
            raise RuntimeError("this controller was built for a plan: it has no models to drive")
        if event is Event.BATCH_START:
            self.current = self.precision_at(step)
            self._set_bits(self.current)
        for policy in self.policies:
            policy.on_event(event, step, self.current)
        if event is Event.AFTER_STEP and self.method_edits:
            with torch.no_grad():
                for layer in self.method_edits:
                    layer.quantizer.after_step(layer)

    def _set_bits(self, p: Precision) -> None:
        """Every quantized layer at its student's bits for this step, and quantized (stochastic
        precision then switches units off)."""
        for student in self.students:
            w_bits, a_bits = p.bits(student.w_bits, student.a_bits)
            for _, layer in quant_layers(student.model):
                layer.bits = a_bits if isinstance(layer, QAct) else w_bits
                layer.quantize = True

    @property
    def edits_weights(self) -> bool:
        """Whether the policies or the quantizer methods change the students' weights outside the
        optimizer (at AFTER_STEP)."""
        return bool(self.method_edits) or any(p.edits_weights for p in self.policies)

    # --- the auxiliary branches: modules trained beside the students ----------------------

    @property
    def _aux(self) -> AuxBranch | None:
        return next((p for p in self.policies if isinstance(p, AuxBranch)), None)

    @property
    def aux(self) -> dict[str, AuxBranches]:
        return self._aux.branches if self._aux is not None else {}

    @property
    def aux_removed(self) -> bool:
        return self._aux is not None and self._aux.removed

    def aux_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {name: list(b.parameters()) for name, b in self.aux.items()} if not self.aux_removed else {}

    def when_aux_removed(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the branches are removed (the optimizer stops updating them)."""
        if self._aux is not None:
            self._aux.listeners.append(callback)

    # --- logging and checkpoints ----------------------------------------------------------

    def scalars(self) -> dict[str, float]:
        """The controller's state for TensorBoard, under policy-named tags."""
        p = self.current
        w_bits, a_bits = p.bits(self.students[0].w_bits, self.students[0].a_bits)
        values = {"precision/w_bits": w_bits, "precision/a_bits": a_bits, "precision/stage": p.stage}
        if len(self.students) > 1:
            for s in self.students:
                values[f"precision/w_bits/{s.name}"], values[f"precision/a_bits/{s.name}"] = p.bits(s.w_bits, s.a_bits)
        for policy in self.policies:
            values.update(policy.scalars(p))
        return values

    def state_dict(self) -> dict:
        state = {"precision": dataclasses.asdict(self.current), "aux_removed": False}
        for policy in self.policies:
            state.update(policy.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        for policy in self.policies:
            policy.load_state_dict(state)
        self.current = Precision(**state["precision"])
