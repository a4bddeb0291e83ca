"""Quantization in three layers: pure maths (functional) -> quantized layers -> model conversion."""

from distq.quant.functional import FULL_PRECISION, VALID_BITS, act_quant, aqe_quant, check_bits, weight_quant
from distq.quant.layers import QAct, QConv2d, QLinear, QuantState, quant_layers

__all__ = [
    "FULL_PRECISION",
    "VALID_BITS",
    "QAct",
    "QConv2d",
    "QLinear",
    "QuantState",
    "act_quant",
    "aqe_quant",
    "check_bits",
    "quant_layers",
    "weight_quant",
]
