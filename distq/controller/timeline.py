"""Training time: durations ("30ep", "2000ba", "0.5dur") converted to optimizer steps."""

from __future__ import annotations

from dataclasses import dataclass

from distq.config import ConfigError
from distq.config.duration import parse_duration


@dataclass(frozen=True)
class Clock:
    """Converts durations to optimizer steps for one run."""

    steps_per_epoch: int
    total_steps: int

    def steps(self, value, key: str) -> int:
        amount, unit = parse_duration(value, key)
        if unit == "ba":
            steps = amount
        elif unit == "ep":
            steps = amount * self.steps_per_epoch
        else:
            steps = amount * self.total_steps
        steps = int(round(steps))
        if steps > self.total_steps:
            raise ConfigError(f"{key}={value!r} is longer than the run ({self.run()}): shorten it or train longer")
        return steps

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch

    def span(self, steps: float) -> str:
        """``steps`` for a message, with its length in epochs: "45 steps (4.5 epochs)"."""
        return f"{steps:g} steps ({self.epoch(steps):g} epochs)"

    def run(self) -> str:
        """The run's length for a message: "150 steps: train.epochs=15 of 10 steps"."""
        return f"{self.total_steps} steps: train.epochs={self.total_steps // self.steps_per_epoch} of {self.steps_per_epoch} steps"
