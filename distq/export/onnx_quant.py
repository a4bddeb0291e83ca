"""The quantizers of a trained model as integers and scales: what the ONNX and QONNX writers store.

A quantized weight is ``integers * scale`` with one scale per output channel (or one for the
tensor), the integers in the method's range ``[low, high]``, all from the layer's quantizer
(``QuantMethod.weight_codes``, ``distq.quant.methods``): for example

    DoReFa k >= 2   integers 2q - L (odd, |n| <= L = 2^k - 1), scale 1/L: tanh and the max
                    normalisation are already inside q
    binary k = 1    integers +-1, scale mean|w| (per tensor or per channel, as trained)
    AQE (alpha 1)   the hard quantizer's integers (ternary, or +-2^j), scale 2^-P
    LSQ             round(w / s) in [-2^(b-1), 2^(b-1) - 1], scale the learned step s

A batch-norm that reads the conv's output folds into the scale (``scale * |g|`` per output
channel, the sign of g into the integers) and the bias (``b * g + h``), so the integers stay
the trained ones; where a negative g would move an integer out of an asymmetric range (LSQ's
-2^(b-1)), the batch-norm is not folded (``fold_batchnorm``). A quantized activation is the
method's uniform quantizer (``QuantMethod.act_codes``): unsigned integers
``clamp(round(x / scale), 0, high)``, value ``integer * scale`` (DoReFa: scale 1/L, high L;
PACT: alpha / L; LSQ: its step, high 2^b - 1).

What ONNX cannot express exactly is refused here, naming the layer, in the method's words:
a weight the method's ``onnx_refusal`` rejects (an AQE layer whose alpha is below 1 mixes
``alpha * h(x) + (1 - alpha) * x``), and an activation whose ``act_codes`` is ``Unsupported``
(every AQE activation: sign with sign(0) = +1, a ternary threshold computed per image,
power-of-two levels: none is a QuantizeLinear).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from distq.export.exporter import bn_affine
from distq.export.format import ExportError
from distq.quant.functional import FULL_PRECISION
from distq.quant.layers import QuantState
from distq.quant.methods import Unsupported

SAFETENSORS_HINT = "export it with --format safetensors and run it with 'distq eval --engine int'"


@dataclass
class WeightQuant:
    """A quantized weight: ``weight[c] = integers[c] * scale[c]``."""

    integers: np.ndarray
    """int64, the weight's shape, in [low, high]."""
    scale: np.ndarray
    """float64, one value per output channel, or a single value for the whole tensor."""
    bits: int
    low: int
    high: int
    """The method's range of the integers (``WeightCodes.low``/``high``), not only the values present."""
    offset_bits: int | None
    """``WeightCodes.offset_bits``: k when the integers are 2q - (2^k - 1) (odd), else None."""
    what: str = "quantized"
    """The quantizer, for messages ("4-bit lsq")."""

    @property
    def binary(self) -> bool:
        """Every integer is +-1 (one offset-binary bit)."""
        return self.offset_bits == 1

    @property
    def narrow(self) -> bool:
        """The range is symmetric, [-high, high]."""
        return self.low == -self.high

    def scale_shape(self) -> tuple[int, ...]:
        """The scale as a tensor that broadcasts against the weight."""
        if self.scale.size == 1:
            return ()
        return (self.scale.size,) + (1,) * (self.integers.ndim - 1)


@dataclass
class ActQuant:
    """A k-bit activation: unsigned integers ``clamp(round(x / scale), 0, high)``, value ``integer * scale``."""

    bits: int
    scale: float
    high: int


def weight_bits(module: nn.Module) -> int:
    return module.bits if isinstance(module, QuantState) else FULL_PRECISION


def quantized_weight(name: str, module: nn.Module) -> WeightQuant:
    """The integers and scale of a QConv2d/QLinear's weight, exactly as its quantizer computes it."""
    refusal = module.quantizer.onnx_refusal(module)
    if refusal is not None:
        raise ExportError(f"cannot export layer {name!r} to ONNX: {refusal}, or {SAFETENSORS_HINT}")
    codes = module.quantizer.weight_codes(module)
    return WeightQuant(
        codes.integers.numpy(),
        codes.scale.double().numpy().reshape(-1),
        module.bits,
        codes.low,
        codes.high,
        codes.offset_bits,
        f"{module.bits}-bit {module.quantizer}",
    )


def fold_batchnorm(weight: WeightQuant, g: np.ndarray) -> WeightQuant | None:
    """``weight`` times the batch-norm factor ``g`` per output channel: |g| into the scale,
    the sign of g into the integers; None where a sign would take an integer out of the
    weight's range (an asymmetric one: LSQ's -2^(b-1) has no positive counterpart)."""
    sign = np.where(g < 0, -1, 1)
    integers = weight.integers * sign.reshape((-1,) + (1,) * (weight.integers.ndim - 1))
    if integers.size and (integers.min() < weight.low or integers.max() > weight.high):
        return None
    scale = np.broadcast_to(weight.scale, g.shape) * np.abs(g)
    return WeightQuant(integers, scale, weight.bits, weight.low, weight.high, weight.offset_bits, weight.what)


def activation_quant(name: str, module: nn.Module) -> ActQuant | None:
    """The quantizer of a QAct (None for a full-precision one, which is a ReLU)."""
    if module.bits == FULL_PRECISION:
        return None
    try:
        codes = module.quantizer.act_codes(module)
    except Unsupported as exc:
        raise ExportError(f"cannot export layer {name!r} to ONNX: {exc}; {SAFETENSORS_HINT}") from None
    return ActQuant(codes.bits, codes.scale, codes.high)


def batchnorm_affine(bn: nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    """(g, h) in float64 with bn(z) = z * g + h."""
    g, h = bn_affine(bn, bn.num_features)
    return g.numpy(), h.numpy()


def float_tensor(t: torch.Tensor | np.ndarray) -> np.ndarray:
    data = t.detach().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)
    return data.astype(np.float32)
