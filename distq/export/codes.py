"""What the integers of an export file mean: quantized values <-> integer codes.

Every quantized tensor is written as unsigned ``k``-bit codes, and each code stands for
an exact integer (its *integer form*) times a scale, so that a dot product of a
quantized activation and a quantized weight is an integer dot product times one float:

DoReFa (``method: dorefa``), L = 2^k - 1:
    weights      code q in [0, L]   integer 2q - L      value = scale * (2q - L)
                 (scale = 1/L for k >= 2; scale = E = mean|w| for k = 1, where 2q - 1 = +-1)
    activations  code q in [0, L]   integer q           value = q / L

AQE (``method: aqe``), P = 2^(n-1) - 2 (the finest power-of-two level is 2^-P):
    n = 1        code b in {0, 1}   integer 2b - 1      value = +-1
    n >= 2       code s<<(n-1) | m  integer (-1)^s 2^(P+1-m) for m >= 1, 0 for m = 0
                 value = integer * 2^-P   (n = 2: ternary {0, +-1}; n >= 3: {0, +-2^-p})

The codes come from the training quantizers' own outputs (``distq.quant.functional``),
never from a re-implementation, so the file holds exactly what the fake-quantized model
computes with.
"""

from __future__ import annotations

import torch

from distq.quant.functional import aqe_hard, binary_weight_scale, weight_quant


def levels(bits: int) -> int:
    return (1 << bits) - 1


def aqe_exponent(bits: int) -> int:
    """P of an n-bit AQE quantizer: values are integers times 2^-P (0 for 1 and 2 bits)."""
    return max((1 << (bits - 1)) - 2, 0)


# --- weights ----------------------------------------------------------------------------


def dorefa_weight_codes(weight: torch.Tensor, bits: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, the weight's shape) and scale (per output channel, or one value) of a
    DoReFa-quantized weight."""
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


def aqe_weight_codes(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scale (2^-P) of an AQE weight; only the hard quantizer h is used at
    inference (alpha = 1, the end of the AQE schedule)."""
    with torch.no_grad():
        hard = aqe_hard(weight, bits)
    return aqe_codes(hard, bits), torch.tensor([2.0 ** -aqe_exponent(bits)], dtype=torch.float64)


def aqe_codes(hard: torch.Tensor, bits: int) -> torch.Tensor:
    """Sign-magnitude codes of AQE hard-quantized values (see the module docstring)."""
    if bits == 1:
        return (hard > 0).to(torch.uint8)
    mag = hard.abs()
    # |v| = 2^-(m-1)  =>  m = 1 - log2|v|; zero keeps m = 0.
    m = torch.where(mag > 0, 1 - torch.log2(torch.where(mag > 0, mag, torch.ones_like(mag))), torch.zeros_like(mag))
    sign = (hard < 0).to(torch.int32)
    return ((sign << (bits - 1)) | torch.round(m).to(torch.int32)).to(torch.uint8)


def weight_integers(codes: torch.Tensor, bits: int, method: str) -> torch.Tensor:
    """The integer form (int64) of weight codes: 2q - L for DoReFa, +-2^(P+1-m) for AQE."""
    codes = codes.to(torch.int64)
    if method == "dorefa" or bits == 1:
        return 2 * codes - levels(bits)
    return aqe_integers(codes, bits)


def aqe_integers(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer form of n >= 2 bit AQE sign-magnitude codes."""
    codes = codes.to(torch.int64)
    m = codes & ((1 << (bits - 1)) - 1)
    sign = 1 - 2 * (codes >> (bits - 1))
    magnitude = torch.where(m > 0, torch.ones_like(m) << (aqe_exponent(bits) + 1 - m).clamp(min=0), torch.zeros_like(m))
    return sign * magnitude
