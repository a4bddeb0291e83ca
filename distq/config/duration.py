"""Training time as the config writes it: "30ep" (epochs), "2000ba" (optimizer steps) or
"0.5dur" (a fraction of the run). ``distq.controller.timeline.Clock`` turns it into steps."""

from __future__ import annotations

import re

from distq.config.loader import ConfigError

Duration = str
"""Training time: "30ep" (epochs), "2000ba" (optimizer steps) or "0.5dur" (fraction of the run)."""

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
