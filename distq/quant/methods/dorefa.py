"""DoReFa quantizers (docs/methods.md, "DoReFa"): k-bit weights 2 Q_k(tanh(w) / (2 max|tanh w|)
+ 1/2) - 1 (binary mean|w| sign(w) at 1 bit) and k-bit activations Q_k(clamp(x, 0, 1)), with
straight-through rounding. No learnable parameters: a bit-width change needs nothing.

Integer form, L = 2^k - 1: weight code q in [0, L] stands for the integer 2q - L (scale 1/L;
at 1 bit the integer is +-1 and the scale mean|w|); activation code q is the integer q,
value q / L."""

from __future__ import annotations

import torch
import torch.nn as nn

from distq.quant.functional import act_quant, binary_weight_scale, weight_quant
from distq.quant.methods.base import ActCodes, IntActivation, QuantMethod, WeightCodes, register


def levels(bits: int) -> int:
    return (1 << bits) - 1


def dorefa_weight_codes(weight: torch.Tensor, bits: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes q (uint8, the weight's shape) and scale (per output channel, or one value) of a
    DoReFa-quantized weight, from the training quantizer's own output."""
    with torch.no_grad():
        wq = weight_quant(weight, bits, per_channel)
        if bits == 1:
            codes = (wq > 0).to(torch.uint8)
            scale = binary_weight_scale(weight, per_channel).reshape(-1)
        else:
            # wq = 2q/L - 1 up to float rounding, so the rounding below recovers q exactly.
            codes = torch.round((wq + 1) * (levels(bits) / 2)).to(torch.uint8)
            scale = torch.tensor([1.0 / levels(bits)], dtype=torch.float64)
    return codes, scale.double()


def unit_values(ints: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The values of activation integers, ints / (2^bits - 1), as ``quantize_unit`` has them."""
    return ints.to(dtype) / levels(bits)


@register
class DoReFa(QuantMethod):
    key = "dorefa"

    def weight(self, layer: nn.Module, w: torch.Tensor, bits: int) -> torch.Tensor:
        return weight_quant(w, bits, layer.per_channel, layer.kernels)

    def act(self, layer: nn.Module, x: torch.Tensor, bits: int) -> torch.Tensor:
        return act_quant(x, bits, layer.kernels)

    # --- export ---------------------------------------------------------------------------------

    def weight_codes(self, layer: nn.Module) -> WeightCodes:
        codes, scale = dorefa_weight_codes(layer.weight.detach().float(), layer.bits, layer.per_channel)
        bits = layer.bits
        return WeightCodes(codes, self.integers(codes, bits), scale.reshape(-1), -levels(bits), levels(bits), self.offset_bits(bits))

    def integers(self, codes: torch.Tensor, bits: int) -> torch.Tensor:
        return 2 * codes.to(torch.int64) - levels(bits)

    def offset_bits(self, bits: int) -> int | None:
        return bits

    def act_codes(self, layer: nn.Module) -> ActCodes:
        return ActCodes(layer.bits, 1.0 / levels(layer.bits), levels(layer.bits))

    def int_activation(self, x: torch.Tensor, bits: int, record: dict) -> IntActivation:
        n = levels(bits)
        ints = torch.round(x.clamp(0, 1) * n).to(torch.uint8)  # quantize_unit's expression
        return IntActivation(unit_values(ints, bits, x.dtype), ints, ("unsigned", bits), 1.0 / n)

    def int_values(self, ints: torch.Tensor, bits: int, record: dict, dtype: torch.dtype) -> torch.Tensor:
        return unit_values(ints, bits, dtype)

    def unit_levels(self, bits: int) -> int | None:
        return levels(bits)
