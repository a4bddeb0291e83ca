"""AQE, the asymptotic-quantized estimator (docs/methods.md, "AQE"): the forward mixes
alpha h(x) + (1 - alpha) x, h the hard quantizer (sign at 1 bit, a ternary threshold 0.5 mean|x|
at 2, power-of-two levels above), the gradient is 2 alpha g where |x| <= 1. alpha is precision
state (``precision.aqe`` schedules it); the latent weights are clipped to [-1, 1] after every
update. No learnable parameters.

Integer form, P = 2^(n-1) - 2 (the finest level is 2^-P):
    n = 1        code b in {0, 1}   integer 2b - 1      value = +-1
    n >= 2       code s<<(n-1) | m  integer (-1)^s 2^(P+1-m) for m >= 1, 0 for m = 0
                 value = integer * 2^-P   (n = 2: ternary {0, +-1}; n >= 3: {0, +-2^-p})
Only h is exported (alpha = 1, the end of the schedule)."""

from __future__ import annotations

import torch
import torch.nn as nn

from distq.quant.functional import aqe_hard, aqe_quant
from distq.quant.methods.base import WEIGHT, IntActivation, QuantMethod, Unsupported, WeightCodes, register

MAX_ENGINE_BITS = 5
"""n bits has levels down to 2^-(2^(n-1)-2); past 5 bits its integers outgrow int64 sums."""


def exponent(bits: int) -> int:
    """P of an n-bit AQE quantizer: values are integers times 2^-P (0 for 1 and 2 bits)."""
    return max((1 << (bits - 1)) - 2, 0)


def sign_magnitude_codes(hard: torch.Tensor, bits: int) -> torch.Tensor:
    """Sign-magnitude codes of hard-quantized values (see the module docstring)."""
    if bits == 1:
        return (hard > 0).to(torch.uint8)
    mag = hard.abs()
    # |v| = 2^-(m-1)  =>  m = 1 - log2|v|; zero keeps m = 0.
    m = torch.where(mag > 0, 1 - torch.log2(torch.where(mag > 0, mag, torch.ones_like(mag))), torch.zeros_like(mag))
    sign = (hard < 0).to(torch.int32)
    return ((sign << (bits - 1)) | torch.round(m).to(torch.int32)).to(torch.uint8)


@register
class Aqe(QuantMethod):
    key = "aqe"
    edits_weights = True
    mixes_alpha = True

    def weight(self, layer: nn.Module, w: torch.Tensor, bits: int) -> torch.Tensor:
        return aqe_quant(w, bits, layer.alpha, kernels=layer.kernels)

    def act(self, layer: nn.Module, x: torch.Tensor, bits: int) -> torch.Tensor:
        return aqe_quant(x, bits, layer.alpha, per_sample=True, kernels=layer.kernels)

    def after_step(self, layer: nn.Module) -> None:
        if layer.role == WEIGHT:
            layer.weight.clamp_(-1.0, 1.0)

    # --- export ---------------------------------------------------------------------------------

    def export_warning(self, layer: nn.Module) -> str | None:
        if layer.alpha >= 1:
            return None
        return (
            "AQE layers end training with alpha < 1; the export (like any inference) uses only the hard quantizer, "
            "which this model was not trained to end at: train with an AQE alpha schedule (precision.aqe) so that alpha reaches 1"
        )

    def onnx_refusal(self, layer: nn.Module) -> str | None:
        if layer.alpha < 1:
            return (
                f"its AQE weight has alpha {layer.alpha:g} < 1, so the model computes alpha * h(w) + (1 - alpha) * w, "
                "not a quantized weight; train until alpha reaches 1 (precision.aqe)"
            )
        return None

    def weight_codes(self, layer: nn.Module) -> WeightCodes:
        """The codes of h(w) (inference runs h, the end of the alpha schedule)."""
        bits = layer.bits
        with torch.no_grad():
            codes = sign_magnitude_codes(aqe_hard(layer.weight.detach().float(), bits), bits)
        scale = torch.tensor([2.0 ** -exponent(bits)], dtype=torch.float64)
        top = 1 if bits == 1 else 1 << exponent(bits)
        return WeightCodes(codes, self.integers(codes, bits), scale, -top, top, self.offset_bits(bits))

    def offset_bits(self, bits: int) -> int | None:
        return 1 if bits == 1 else None  # +-1 is 2b - 1; n >= 2: sign-magnitude, packed as two's complement

    def integers(self, codes: torch.Tensor, bits: int) -> torch.Tensor:
        codes = codes.to(torch.int64)
        if bits == 1:
            return 2 * codes - 1
        m = codes & ((1 << (bits - 1)) - 1)
        sign = 1 - 2 * (codes >> (bits - 1))
        magnitude = torch.where(m > 0, torch.ones_like(m) << (exponent(bits) + 1 - m).clamp(min=0), torch.zeros_like(m))
        return sign * magnitude

    def act_codes(self, layer: nn.Module):
        what = {
            1: "a sign quantizer (x >= 0 -> +1, so 0 -> +1), which no QuantizeLinear reproduces",
            2: "a ternary threshold computed per image (0.5 * mean|x| of each sample), which ONNX's fixed scales cannot express",
        }.get(layer.bits, "power-of-two levels, which are not the uniform levels of QuantizeLinear")
        raise Unsupported(f"its {layer.bits}-bit AQE activation is {what}")

    def int_activation(self, x: torch.Tensor, bits: int, record: dict) -> IntActivation:
        hard = aqe_hard(x, bits, tuple(range(1, x.dim())))  # the per-sample threshold, as QAct
        p = exponent(bits)
        # int8 while the two's complement code fits a byte: the fast byte-parallel packing.
        ints = torch.round(hard * 2.0**p).to(torch.int8 if p + 2 <= 8 else torch.int16)
        return IntActivation(hard, ints, ("sign", 1) if bits == 1 else ("twos", p + 2), 2.0**-p)

    def max_engine_bits(self) -> int:
        return MAX_ENGINE_BITS

    def int_values(self, ints: torch.Tensor, bits: int, record: dict, dtype: torch.dtype) -> torch.Tensor:
        return ints.to(dtype) * 2.0 ** -exponent(bits)
