"""Training time: durations like "30ep", "2000ba", "0.5dur" and their conversion to steps."""

from __future__ import annotations

import re
from dataclasses import dataclass

from distq.config.loader import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ep|ba|dur)?\s*$")


def parse_duration(value, key: str) -> tuple[float, str]:
    """``"30ep"`` -> ``(30.0, "ep")``; a bare number counts as epochs, also as a string (the
    config stores durations as strings, so YAML's ``3`` arrives here as ``"3"``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), "ep"
    match = _DURATION.match(str(value))
    if not match:
        raise ConfigError(f'{key}={value!r} is not a duration: write e.g. "30ep" (epochs), "2000ba" (steps) or "0.5dur" (fraction of the run)')
    return float(match.group(1)), match.group(2) or "ep"


def duration_epochs(value, key: str, total_epochs: int) -> float | None:
    """The duration in epochs, or None for step counts (unknown until the data is loaded)."""
    amount, unit = parse_duration(value, key)
    if unit == "ep":
        return amount
    if unit == "dur":
        return amount * total_epochs
    return None


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
            raise ConfigError(f"{key}={value!r} is longer than the run ({self.total_steps} steps): shorten it or train longer")
        return steps

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch
