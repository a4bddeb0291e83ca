"""The precision controller: every schedule of METHODS.md sections 2-7, as policies."""

from distq.controller.controller import PrecisionController, Student
from distq.controller.policies import Event, Precision
from distq.controller.timeline import Clock

__all__ = ["Clock", "Event", "Precision", "PrecisionController", "Student"]
