"""Pure tensor maths of the quantizers (METHODS.md section 1).

Everything here is a function of tensors and plain numbers; the layers in
``distq.quant.layers`` decide *when* to call it. Each quantizer is a custom
autograd function so that the forward is a single fused expression and the
backward saves at most one mask, never the intermediate graph.

Bit-width conventions: ``bits`` is an int in 1..8, or 32 meaning "full
precision" (the input is returned unchanged).
"""

from __future__ import annotations

import torch

FULL_PRECISION = 32
VALID_BITS = (1, 2, 3, 4, 5, 6, 7, 8, FULL_PRECISION)


def check_bits(bits: int, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise ValueError(f"{what}={bits!r} is not a valid bit-width: use 1..8, or 32 for full precision")
    return bits


def quantize_unit(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Q_k(z) = round((2^k - 1) z) / (2^k - 1) for z in [0, 1], with no gradient handling."""
    levels = (1 << bits) - 1
    return torch.round(z * levels) / levels


class _RoundSTE(torch.autograd.Function):
    """Q_k with the straight-through estimator: identity gradient."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, bits: int) -> torch.Tensor:
        return quantize_unit(z, bits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def round_ste(z: torch.Tensor, bits: int) -> torch.Tensor:
    return _RoundSTE.apply(z, bits)


def _reduce_dims(w: torch.Tensor, per_channel: bool) -> tuple[int, ...] | None:
    return tuple(range(1, w.dim())) if per_channel and w.dim() > 1 else None


def _amax(t: torch.Tensor, per_channel: bool) -> torch.Tensor:
    dims = _reduce_dims(t, per_channel)
    return t.amax() if dims is None else t.amax(dim=dims, keepdim=True)


def _mean(t: torch.Tensor, per_channel: bool) -> torch.Tensor:
    dims = _reduce_dims(t, per_channel)
    return t.mean() if dims is None else t.mean(dim=dims, keepdim=True)


class _BinaryWeight(torch.autograd.Function):
    """w_q = E * sign(w), E = mean|w| (detached); STE with the gradient clipped to |w| <= 1."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, per_channel: bool) -> torch.Tensor:
        ctx.save_for_backward(w)
        scale = _mean(w.abs(), per_channel)
        # sign(0) is taken as +1 so that exactly two levels exist.
        return torch.where(w >= 0, scale, -scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype), None


def binary_weight_scale(w: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """E = mean|w| of the binary weight quantizer, shared with the exporter."""
    return _mean(w.abs(), per_channel)


def weight_quant(w: torch.Tensor, bits: int, per_channel: bool = False) -> torch.Tensor:
    """DoReFa-style weight quantizer.

    k >= 2: ``2 * Q_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1``; the gradient flows through
    tanh and the normalisation, only the rounding is straight-through.
    k == 1: ``mean|w| * sign(w)``.  k == 32: ``w`` unchanged.
    """
    if bits == FULL_PRECISION:
        return w
    if bits == 1:
        return _BinaryWeight.apply(w, per_channel)
    t = torch.tanh(w)
    z = t / (2 * _amax(t.abs(), per_channel)) + 0.5
    return 2 * round_ste(z, bits) - 1


class _ActQuant(torch.autograd.Function):
    """a_q = Q_k(clamp(x, 0, 1)); gradient 1 inside [0, 1] and 0 outside."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bits: int) -> torch.Tensor:
        ctx.save_for_backward((x >= 0) & (x <= 1))
        return quantize_unit(x.clamp(0, 1), bits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None


def act_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """k-bit activation quantizer; bits=32 returns the input unchanged."""
    if bits == FULL_PRECISION:
        return x
    return _ActQuant.apply(x, bits)


# --- AQE: the asymptotic-quantized estimator (seed 004) -------------------------------


def pow2_magnitudes(bits: int) -> list[float]:
    """Non-zero magnitudes of the n >= 3 bit AQE quantizer: 1, 1/2, ..., 2^-(2^(n-1)-2)."""
    return [2.0**-p for p in range((1 << (bits - 1)) - 1)]


def aqe_hard(x: torch.Tensor, bits: int, sample_dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """The hard quantizer h of AQE.

    1 bit: sign (0 -> +1). 2 bits: ternary {0, +-1} with threshold Delta = 0.5 * mean|x|,
    the mean over the whole tensor, or over ``sample_dims`` (per sample, for activations).
    n >= 3 bits: power-of-two levels {0, +-2^-p}, |x| clipped to 1 and rounded to the
    nearest level (thresholds at the midpoints between levels).
    """
    if bits == 1:
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    if bits == 2:
        mag = x.abs()
        mean = mag.mean() if sample_dims is None else mag.mean(dim=sample_dims, keepdim=True)
        return torch.sign(x) * (mag > 0.5 * mean).to(x.dtype)
    levels = pow2_magnitudes(bits)
    mag = x.abs().clamp(max=1.0)
    out = torch.zeros_like(mag)
    # Walk the levels from the smallest up; each midpoint crossed lifts |x| to that level.
    below = 0.0
    for level in reversed(levels):
        out = torch.where(mag >= (below + level) / 2, torch.full_like(mag, level), out)
        below = level
    return torch.sign(x) * out


class _AQE(torch.autograd.Function):
    """Forward alpha*h(x) + (1-alpha)*x; backward 2*alpha*g*1{|x| <= 1}."""

    @staticmethod
    def forward(ctx, x, bits, alpha, sample_dims):
        ctx.alpha = alpha
        ctx.save_for_backward(x.abs() <= 1)
        hard = aqe_hard(x, bits, sample_dims)
        if alpha == 1.0:
            return hard
        return alpha * hard + (1.0 - alpha) * x

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return 2.0 * ctx.alpha * grad * inside.to(grad.dtype), None, None, None


def aqe_quant(x: torch.Tensor, bits: int, alpha: float, per_sample: bool = False) -> torch.Tensor:
    """AQE estimator; bits=32 returns x. ``per_sample`` computes the ternary threshold per sample."""
    if bits == FULL_PRECISION:
        return x
    sample_dims = tuple(range(1, x.dim())) if per_sample and x.dim() > 1 else None
    return _AQE.apply(x, bits, float(alpha), sample_dims)
