"""Processes, devices and the training engine: all distributed code lives here."""

from distq.dist.engine import Engine, TeamModule, build_engine
from distq.dist.env import DistEnv, detect

__all__ = ["DistEnv", "Engine", "TeamModule", "build_engine", "detect"]
