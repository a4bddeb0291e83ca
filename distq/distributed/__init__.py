"""Processes, devices and the training engine: all distributed code lives here."""

from distq.distributed.engine import Engine, TeamModule, build_engine, close_process_group
from distq.distributed.env import DistEnv, detect

__all__ = ["DistEnv", "Engine", "TeamModule", "build_engine", "close_process_group", "detect"]
