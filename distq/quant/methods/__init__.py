"""Quantizer methods, one module each (``distq.quant.methods.base`` says what a method is)."""

from distq.quant.methods import aqe, dorefa, lsq, pact  # noqa: F401  (each registers itself)
from distq.quant.methods.base import (
    ACT,
    WEIGHT,
    ActCodes,
    IntActivation,
    QuantMethod,
    Unsupported,
    WeightCodes,
    build_method,
    learnable_names,
    method_class,
    method_keys,
)
from distq.quant.methods.lsq import LsqConfig
from distq.quant.methods.pact import PactConfig

__all__ = [
    "ACT",
    "WEIGHT",
    "ActCodes",
    "IntActivation",
    "LsqConfig",
    "PactConfig",
    "QuantMethod",
    "Unsupported",
    "WeightCodes",
    "build_method",
    "learnable_names",
    "method_class",
    "method_keys",
]
