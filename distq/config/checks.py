"""Value checks shared by the config sections; a failed check names the key."""

from __future__ import annotations


def check_positive(key: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{key}={value} must be > 0")


def check_fraction(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{key}={value} must be in [0, 1]")
