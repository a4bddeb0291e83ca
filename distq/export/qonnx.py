"""Quantized weights and activations as QONNX nodes, for FINN-style FPGA flows.

    activation       Quant(x, scale 1/L, zero point 0, bit width k, signed 0, narrow 0)
    binary weight    BipolarQuant(+-1, scale)
    k-bit weight     Quant(integers * scale, scale, 0, bit width b, signed 1, narrow 1)

Weights are float initializers holding the quantized values, as QONNX flows expect; the
Quant node's rounding recovers the integers exactly. DoReFa's k-bit weights are the odd
integers of [-L, L]: with the zero point 0 that FINN requires, that is a narrow signed
(k + 1)-bit range, of which only the 2^k odd values occur. Every node rounds half to even
(rounding_mode ROUND), as torch and QuantizeLinear do.
"""

from __future__ import annotations

import numpy as np

from distq.export.onnx_graph import Graph
from distq.export.onnx_quant import ActQuant, WeightQuant

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
        return self._quant(graph, f"{name}.weight", values, scales, quant.limit.bit_length() + 1, signed=True)

    def activation(self, graph: Graph, name: str, x: str, quant: ActQuant) -> str:
        scale = graph.constant(f"{name}.scale", np.array(1.0 / quant.levels, dtype=np.float32))
        return self._quant(graph, name, x, scale, quant.bits, signed=False)

    def _quant(self, graph: Graph, name: str, x: str, scale: str, bits: int, signed: bool) -> str:
        zero = graph.constant(f"{name}.zero_point", np.array(0.0, dtype=np.float32))
        width = graph.constant(f"{name}.bit_width", np.array(float(bits), dtype=np.float32))
        return graph.add(
            "Quant", [x, scale, zero, width], name, domain=DOMAIN, signed=int(signed), narrow=int(signed), rounding_mode="ROUND"
        )
