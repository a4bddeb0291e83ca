"""The quantizers of a trained model as integers and scales: what the ONNX and QONNX writers store.

A quantized weight is ``integers * scale`` with one scale per output channel (or one for the
tensor), the integers in the narrow signed range ``[-limit, limit]``:

    DoReFa k >= 2   integers 2q - L (odd, |n| <= L = 2^k - 1), scale 1/L: tanh and the max
                    normalisation are already inside q (``distq.export.codes``)
    binary k = 1    integers +-1, scale mean|w| (per tensor or per channel, as trained)
    AQE (alpha 1)   the hard quantizer's integers (ternary, or +-2^j), scale 2^-P

A batch-norm that reads the conv's output folds into the scale (``scale * |g|`` per output
channel, the sign of g into the integers) and the bias (``b * g + h``), so the integers stay
the trained ones. A quantized activation is DoReFa's ``round(clamp(x, 0, 1) * L) / L``:
unsigned integers 0..L, scale 1/L.

What ONNX cannot express exactly is refused here, naming the layer: an AQE layer whose alpha
is below 1 (the forward mixes ``alpha * h(x) + (1 - alpha) * x``), and every AQE activation
(sign with sign(0) = +1, a ternary threshold computed per image, power-of-two levels: none is
a QuantizeLinear).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from distq.export.codes import aqe_weight_codes, dorefa_weight_codes, levels, weight_integers
from distq.export.exporter import bn_affine
from distq.export.format import ExportError
from distq.quant.functional import FULL_PRECISION
from distq.quant.layers import QuantState

SAFETENSORS_HINT = "export it with --format safetensors and run it with 'distq eval --engine int'"


@dataclass
class WeightQuant:
    """A quantized weight: ``weight[c] = integers[c] * scale[c]``."""

    integers: np.ndarray
    """int64, the weight's shape, in [-limit, limit]."""
    scale: np.ndarray
    """float64, one value per output channel, or a single value for the whole tensor."""
    bits: int
    method: str
    limit: int

    @property
    def binary(self) -> bool:
        return self.bits == 1 and self.limit == 1

    def scale_shape(self) -> tuple[int, ...]:
        """The scale as a tensor that broadcasts against the weight."""
        if self.scale.size == 1:
            return ()
        return (self.scale.size,) + (1,) * (self.integers.ndim - 1)


@dataclass
class ActQuant:
    """A DoReFa k-bit activation: unsigned integers 0..levels, scale 1/levels."""

    bits: int

    @property
    def levels(self) -> int:
        return levels(self.bits)


def weight_bits(module: nn.Module) -> int:
    return module.bits if isinstance(module, QuantState) else FULL_PRECISION


def quantized_weight(name: str, module: nn.Module) -> WeightQuant:
    """The integers and scale of a QConv2d/QLinear's weight, exactly as its quantizer computes it."""
    bits = module.bits
    weight = module.weight.detach().float()
    if module.method == "aqe":
        _refuse_soft_aqe(name, module)
        codes, scale = aqe_weight_codes(weight, bits)
    else:
        codes, scale = dorefa_weight_codes(weight, bits, module.per_channel)
    integers = weight_integers(codes, bits, module.method).numpy()
    limit = int(np.abs(integers).max()) if integers.size else 1
    limit = max(limit, levels(bits) if module.method == "dorefa" else 1)
    return WeightQuant(integers, scale.double().numpy().reshape(-1), bits, module.method, limit)


def fold_batchnorm(weight: WeightQuant, g: np.ndarray) -> WeightQuant:
    """``weight`` times the batch-norm factor ``g`` per output channel: |g| into the scale,
    the sign of g into the (symmetric) integers."""
    sign = np.where(g < 0, -1, 1)
    integers = weight.integers * sign.reshape((-1,) + (1,) * (weight.integers.ndim - 1))
    scale = np.broadcast_to(weight.scale, g.shape) * np.abs(g)
    return WeightQuant(integers, scale, weight.bits, weight.method, weight.limit)


def activation_quant(name: str, module: nn.Module) -> ActQuant | None:
    """The quantizer of a QAct (None for a full-precision one, which is a ReLU)."""
    bits = module.bits
    if bits == FULL_PRECISION:
        return None
    if module.method == "aqe":
        what = {
            1: "a sign quantizer (x >= 0 -> +1, so 0 -> +1), which no QuantizeLinear reproduces",
            2: "a ternary threshold computed per image (0.5 * mean|x| of each sample), which ONNX's fixed scales cannot express",
        }.get(bits, "power-of-two levels, which are not the uniform levels of QuantizeLinear")
        raise ExportError(f"cannot export layer {name!r} to ONNX: its {bits}-bit AQE activation is {what}; {SAFETENSORS_HINT}")
    return ActQuant(bits)


def _refuse_soft_aqe(name: str, module: nn.Module) -> None:
    if module.alpha < 1:
        raise ExportError(
            f"cannot export layer {name!r} to ONNX: its AQE weight has alpha {module.alpha:g} < 1, so the model computes "
            f"alpha * h(w) + (1 - alpha) * w, not a quantized weight; train until alpha reaches 1 (precision.aqe), or {SAFETENSORS_HINT}"
        )


def batchnorm_affine(bn: nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    """(g, h) in float64 with bn(z) = z * g + h."""
    g, h = bn_affine(bn, bn.num_features)
    return g.numpy(), h.numpy()


def float_tensor(t: torch.Tensor | np.ndarray) -> np.ndarray:
    data = t.detach().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)
    return data.astype(np.float32)
