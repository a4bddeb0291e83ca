"""The precision controller: the schedules of docs/methods.md, each a policy that reacts to the
training loop's events."""

from distq.controller.controller import PrecisionController
from distq.controller.events import Event
from distq.controller.precision import Precision
from distq.controller.timeline import Clock

__all__ = ["Clock", "Event", "Precision", "PrecisionController"]
