"""What every precision policy is: its config checks, its part of a step's ``Precision``, the
events it reacts to, its TensorBoard scalars and its share of the controller's checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from distq.controller.events import Event
from distq.controller.precision import Precision
from distq.controller.timeline import Clock
from distq.models.team import Member


@dataclass(frozen=True)
class Targets:
    """The lowest bit-widths any student trains to, and the config key that sets them."""

    w_bits: int
    a_bits: int
    key: str
    """"quant" or "guided.students", for messages."""


class Policy:
    """A training-time precision policy.

    ``__init__`` reads the policy's config section and rejects a schedule that does not fit the
    run, naming the key; ``contribute`` is a pure function of the step (so every rank and every
    resumed run agrees); ``bind`` gives it the students' models, after which it acts on them
    from ``on_<event>`` handlers (see ``Event``).
    """

    key: ClassVar[str]
    """Its config section: ``precision.<key>``."""
    excludes: ClassVar[dict[str, str]] = {}
    """Policies (by key) it cannot run with, and why."""
    edits_weights: ClassVar[bool] = False
    """Whether its handlers change the students' weights outside the optimizer (the engine must
    then refresh any copy of them it keeps)."""

    @classmethod
    def configured(cls, cfg) -> bool:
        return getattr(cfg.precision, cls.key) is not None

    def __init__(self, cfg, clock: Clock, targets: Targets):
        self.seed = cfg.seed

    def contribute(self, step: int, p: Precision) -> None:
        """Fill in this policy's part of the precision of ``step``."""

    def bind(self, students: list[Member]) -> None:
        """Take the students whose models the policy acts on."""
        self.students = students

    def on_event(self, event: Event, step: int, p: Precision) -> None:
        getattr(self, f"on_{event.value}")(step, p)

    def on_fit_start(self, step: int, p: Precision) -> None: ...
    def on_epoch_start(self, step: int, p: Precision) -> None: ...
    def on_batch_start(self, step: int, p: Precision) -> None: ...
    def on_after_step(self, step: int, p: Precision) -> None: ...
    def on_epoch_end(self, step: int, p: Precision) -> None: ...
    def on_fit_end(self, step: int, p: Precision) -> None: ...

    def scalars(self, p: Precision) -> dict[str, float]:
        """This policy's TensorBoard scalars for the step whose precision is ``p``."""
        return {}

    def state_dict(self) -> dict:
        """History that is not a function of the step (only the aux branch has some)."""
        return {}

    def load_state_dict(self, state: dict) -> None: ...
