"""Integer inference: run an export file with integer activations and bit-operation layers."""

from distq.infer.engine import IntegerModel, build_engine, load_engine

__all__ = ["IntegerModel", "build_engine", "load_engine"]
