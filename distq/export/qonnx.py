"""Quantized weights and activations as QONNX nodes, for FINN-style FPGA flows.

    activation       Quant(x, scale, zero point 0, bit width k, signed 0, narrow 0)
    binary weight    BipolarQuant(+-1, scale)
    k-bit weight     Quant(integers * scale, scale, 0, bit width b, signed 1, narrow)

The activation's scale is the method's (``QuantMethod.act_codes``: DoReFa 1/L, PACT alpha / L,
LSQ its step); its integers are 0..2^k - 1, the unsigned k-bit range. Weights are float
initializers holding the quantized values, as QONNX flows expect; the Quant node's rounding
recovers the integers exactly. Its range is the method's ``[low, high]`` (``WeightQuant``):
a symmetric one is narrow, b the fewest bits holding it, so DoReFa's k-bit weights, the odd
integers of [-L, L], are a narrow signed (k + 1)-bit range (with the zero point 0 that FINN
requires) of which only the 2^k odd values occur; LSQ's [-2^(b-1), 2^(b-1) - 1] is the full
signed b-bit range (narrow 0). Every node rounds half to even (rounding_mode ROUND), as torch
and QuantizeLinear do.
"""

from __future__ import annotations

import numpy as np

from distq.export.format import ExportError
from distq.export.onnx_graph import Graph
from distq.export.onnx_quant import SAFETENSORS_HINT, ActQuant, WeightQuant

DOMAIN = "qonnx.custom_op.general"


class QONNXWriter:
    domains: dict[str, int] = {DOMAIN: 1}

    def weight(self, graph: Graph, name: str, quant: WeightQuant) -> str:
        scale = quant.scale.reshape(quant.scale_shape())
        scales = graph.constant(f"{name}.weight_scale", scale.astype(np.float32))
        if quant.binary:
            signs = graph.constant(f"{name}.weight_sign", quant.integers.astype(np.float32))
            return graph.add("BipolarQuant", [signs, scales], f"{name}.weight", domain=DOMAIN)
        values = graph.constant(f"{name}.weight_float", (quant.integers * scale).astype(np.float32))
        bits = max(quant.high, -quant.low - 1, 1).bit_length() + 1
        return self._quant(graph, f"{name}.weight", values, scales, bits, signed=True, narrow=quant.narrow)

    def activation(self, graph: Graph, name: str, x: str, quant: ActQuant) -> str:
        if quant.high != (1 << quant.bits) - 1:
            raise ExportError(
                f"cannot export layer {name!r} to QONNX: its {quant.bits}-bit activation stops at {quant.high}, which a "
                f"Quant node's unsigned range cannot state; {SAFETENSORS_HINT}"
            )
        scale = graph.constant(f"{name}.scale", np.array(quant.scale, dtype=np.float32))
        return self._quant(graph, name, x, scale, quant.bits, signed=False, narrow=False)

    def _quant(self, graph: Graph, name: str, x: str, scale: str, bits: int, signed: bool, narrow: bool) -> str:
        zero = graph.constant(f"{name}.zero_point", np.array(0.0, dtype=np.float32))
        width = graph.constant(f"{name}.bit_width", np.array(float(bits), dtype=np.float32))
        return graph.add(
            "Quant", [x, scale, zero, width], name, domain=DOMAIN, signed=int(signed), narrow=int(narrow), rounding_mode="ROUND"
        )
