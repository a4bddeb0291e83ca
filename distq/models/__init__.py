"""Model registry and conversion to quantized layers."""

from distq.models.convert import quantize_model
from distq.models.registry import build_float_model, model_names, register_model

__all__ = ["build_float_model", "model_names", "quantize_model", "register_model"]
