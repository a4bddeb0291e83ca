"""Fault injection for the non-finite tests: ``DISTQ_NONFINITE_AT_STEP=N`` fills the training
images of optimizer step N (1-based, every micro-batch of it, every rank) with NaN, as a
corrupt batch or an overflowing activation would. Read only when set; for tests, not users."""

from __future__ import annotations

import os

import torch

from distq.errors import DistqError

VARIABLE = "DISTQ_NONFINITE_AT_STEP"


class TrainingFaults:
    def __init__(self, spec: str | None = None):
        spec = os.environ.get(VARIABLE) if spec is None else spec
        try:
            self.nonfinite_step = int(spec) if spec else None
        except ValueError:
            raise DistqError(f"{VARIABLE}={spec!r} is not a step number") from None

    def batch(self, images: torch.Tensor, step: int) -> torch.Tensor:
        """The images the loop trains on at ``step`` completed steps."""
        if self.nonfinite_step is not None and step + 1 == self.nonfinite_step:
            return torch.full_like(images, float("nan"))
        return images
