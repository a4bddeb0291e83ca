"""Quantized weights and activations as standard ONNX: the QCDQ pattern.

    activation   x -> QuantizeLinear(1/L, uint8) -> Clip(0, L) -> DequantizeLinear(1/L)
    weight       int8 integers -> Clip(-limit, limit) -> DequantizeLinear(scale, axis 0)

QuantizeLinear rounds half to even and saturates at 0, so with the Clip it computes DoReFa's
``round(clamp(x, 0, 1) * L)``; the Clip is left out at 8 bits, where the container's range
is the quantizer's. Weights are stored as their integers (``distq.export.onnx_quant``), so
no QuantizeLinear runs on them; the Clip states their range for tools that read bit-widths
from it. One exception: 8-bit DoReFa weights are the odd integers of [-255, 255], which int8
cannot hold, so they are stored as (n - 1) / 2 and dequantized with twice the scale
plus one scale (an Add after the DequantizeLinear).
"""

from __future__ import annotations

import numpy as np

from distq.export.format import ExportError
from distq.export.onnx_graph import Graph
from distq.export.onnx_quant import SAFETENSORS_HINT, ActQuant, WeightQuant

INT8_MAX = 127


class QCDQWriter:
    domains: dict[str, int] = {}

    def weight(self, graph: Graph, name: str, quant: WeightQuant) -> str:
        scale, offset = quant.scale, None
        if quant.limit <= INT8_MAX:
            stored = quant.integers
        elif quant.method == "dorefa" and quant.bits == 8:
            stored, scale, offset = (quant.integers - 1) // 2, 2 * quant.scale, quant.scale
        else:
            raise ExportError(
                f"cannot export layer {name!r} to ONNX: its {quant.bits}-bit {quant.method} weight has integers up to "
                f"{quant.limit}, beyond int8; {SAFETENSORS_HINT}"
            )
        per_channel = scale.size > 1
        ints = graph.constant(f"{name}.weight_int8", stored.astype(np.int8))
        if quant.limit < INT8_MAX:
            low = graph.constant(f"{name}.weight_min", np.array(-quant.limit, dtype=np.int8))
            high = graph.constant(f"{name}.weight_max", np.array(quant.limit, dtype=np.int8))
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
        scale = graph.constant(f"{name}.scale", np.array(1.0 / quant.levels, dtype=np.float32))
        zero = graph.constant(f"{name}.zero_point", np.array(0, dtype=np.uint8))
        q = graph.add("QuantizeLinear", [x, scale, zero], f"{name}.quant")
        if quant.bits < 8:
            high = graph.constant(f"{name}.max", np.array(quant.levels, dtype=np.uint8))
            q = graph.add("Clip", [q, zero, high], f"{name}.clip")
        return graph.add("DequantizeLinear", [q, scale, zero], name)


def _vector_or_scalar(values: np.ndarray, dtype) -> np.ndarray:
    values = np.asarray(values, dtype=dtype).reshape(-1)
    return values if values.size > 1 else values.reshape(())
