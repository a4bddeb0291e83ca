"""Quantized weights and activations as standard ONNX: the QCDQ pattern.

    activation   x -> QuantizeLinear(scale, uint8) -> Clip(0, high) -> DequantizeLinear(scale)
    weight       int8 integers -> Clip(low, high) -> DequantizeLinear(scale, axis 0)

The activation's scale and ``high`` are the method's (``QuantMethod.act_codes``: DoReFa 1/L
and L, PACT alpha / L and L, LSQ its step and 2^b - 1). QuantizeLinear rounds half to even
and saturates at 0, so with the Clip it computes ``clamp(round(x / scale), 0, high)``; the
Clip is left out where ``high`` is 255, uint8's own range. Weights are stored as their
integers (``distq.export.onnx_quant``), so no QuantizeLinear runs on them; the Clip states
their range (the method's ``[low, high]``, e.g. [-15, 15] for 4-bit DoReFa, [-8, 7] for
4-bit LSQ) for tools that read bit-widths from it, and is left out where the range is
int8's. One exception: integers beyond int8 that are all odd (8-bit DoReFa's odd integers
of [-255, 255]) are stored as (n - 1) / 2 and dequantized with twice the scale plus one
scale (an Add after the DequantizeLinear).
"""

from __future__ import annotations

import numpy as np

from distq.export.format import ExportError
from distq.export.onnx_graph import Graph
from distq.export.onnx_quant import SAFETENSORS_HINT, ActQuant, WeightQuant

INT8_MIN, INT8_MAX = -128, 127
UINT8_MAX = 255


def _odd(quant: WeightQuant) -> bool:
    """Every integer is odd: offset binary (2q - (2^k - 1)), or so by the data."""
    return quant.offset_bits is not None or bool((quant.integers % 2 != 0).all())


class QCDQWriter:
    domains: dict[str, int] = {}

    def weight(self, graph: Graph, name: str, quant: WeightQuant) -> str:
        scale, offset, clip = quant.scale, None, None
        if quant.low >= INT8_MIN and quant.high <= INT8_MAX:
            stored = quant.integers
            if (quant.low, quant.high) != (INT8_MIN, INT8_MAX):
                clip = (quant.low, quant.high)
        elif _odd(quant) and (quant.low - 1) // 2 >= INT8_MIN and (quant.high - 1) // 2 <= INT8_MAX:
            stored, scale, offset = (quant.integers - 1) // 2, 2 * quant.scale, quant.scale
        else:
            raise ExportError(
                f"cannot export layer {name!r} to ONNX: its {quant.what} weight has integers in [{quant.low}, {quant.high}], "
                f"beyond int8; {SAFETENSORS_HINT}"
            )
        per_channel = scale.size > 1
        ints = graph.constant(f"{name}.weight_int8", stored.astype(np.int8))
        if clip is not None:
            low = graph.constant(f"{name}.weight_min", np.array(clip[0], dtype=np.int8))
            high = graph.constant(f"{name}.weight_max", np.array(clip[1], dtype=np.int8))
            ints = graph.add("Clip", [ints, low, high], f"{name}.weight_clip")
        scales = graph.constant(f"{name}.weight_scale", _vector_or_scalar(scale, np.float32))
        zero = graph.constant(f"{name}.weight_zero_point", np.zeros(scale.shape if per_channel else (), dtype=np.int8))
        axis = {"axis": 0} if per_channel else {}
        weight = graph.add("DequantizeLinear", [ints, scales, zero], f"{name}.weight", **axis)
        if offset is None:
            return weight
        shift = graph.constant(f"{name}.weight_offset", offset.astype(np.float32).reshape(quant.scale_shape()))
        return graph.add("Add", [weight, shift], f"{name}.weight_odd")

    def activation(self, graph: Graph, name: str, x: str, quant: ActQuant) -> str:
        scale = graph.constant(f"{name}.scale", np.array(quant.scale, dtype=np.float32))
        zero = graph.constant(f"{name}.zero_point", np.array(0, dtype=np.uint8))
        q = graph.add("QuantizeLinear", [x, scale, zero], f"{name}.quant")
        if quant.high < UINT8_MAX:
            high = graph.constant(f"{name}.max", np.array(quant.high, dtype=np.uint8))
            q = graph.add("Clip", [q, zero, high], f"{name}.clip")
        return graph.add("DequantizeLinear", [q, scale, zero], name)


def _vector_or_scalar(values: np.ndarray, dtype) -> np.ndarray:
    values = np.asarray(values, dtype=dtype).reshape(-1)
    return values if values.size > 1 else values.reshape(())
