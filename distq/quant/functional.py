"""Pure tensor maths of the quantizers (docs/methods.md, "Quantizers").

Everything here is a function of tensors and plain numbers; the layers in
``distq.quant.layers`` decide *when* to call it. Each quantizer is one custom
autograd function: the forward writes its result into a single buffer (every step
after the first in place, with exactly the float operations of the formula), and the
backward is written out by hand from what the forward saved, never from a recorded
graph. On CPU a fresh large tensor costs more than the arithmetic (its pages are
faulted in on first write), so the fewer buffers the faster.

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


def _mean(t: torch.Tensor, per_channel: bool) -> torch.Tensor:
    dims = _reduce_dims(t, per_channel)
    return t.mean() if dims is None else t.mean(dim=dims, keepdim=True)


def _sum(t: torch.Tensor, dims: tuple[int, ...] | None) -> torch.Tensor:
    return t.sum() if dims is None else t.sum(dim=dims, keepdim=True)


def _max_abs(t: torch.Tensor, dims: tuple[int, ...] | None) -> torch.Tensor:
    """max|t| over the whole tensor, or over ``dims`` (kept as size-1 dims)."""
    if dims is None:
        low, high = torch.aminmax(t)  # one pass, no |t| buffer
        return torch.maximum(high, -low)
    return t.abs().amax(dim=dims, keepdim=True)  # aminmax along a dim is slower than this on CPU


class _DorefaWeight(torch.autograd.Function):
    """k >= 2: w_q = 2 Q_k(tanh(w) / (2 s) + 1/2) - 1 with s = max|tanh w| (per layer or channel).

    Forward and backward perform autograd's float operations for that formula (with the
    rounding straight-through) one by one, so outputs and gradients are the same to the
    bit; they only skip the recorded graph and its intermediate buffers. The gradient goes
    through t / (2 s) directly, and through s, whose gradient autograd's amax splits
    equally among the elements where |t| == s (with the sign of t, from abs); then
    tanh' = 1 - t^2.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
        dims = _reduce_dims(w, per_channel)
        levels = (1 << bits) - 1
        t = torch.tanh(w)
        # An all-zero tensor (or channel) has s = 0: take s = 1 there, so that it quantizes
        # to the level nearest 0 instead of 0 / 0 = NaN (t / s is 0 either way).
        s = _max_abs(t, dims)
        s = s.masked_fill(s == 0, 1.0)
        d = 2 * s
        q = t / d
        # round(...) / levels * 2 - 1, with "/ levels * 2" as one exact "/ (levels / 2)".
        q.add_(0.5).mul_(levels).round_().div_(levels / 2).sub_(1)
        ctx.dims = dims
        ctx.save_for_backward(t, s, d)
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        t, s, d = ctx.saved_tensors
        dims = ctx.dims
        # One buffer, reused in place step by step (a fresh CPU buffer costs more than the
        # arithmetic). First dL/ds = 2 dL/dd, dL/dd = sum(-2 g (t / d) / d) (the upstream of
        # t / d is 2 g, from 2 Q - 1).
        buf = t / d
        grad_s = -4 * _sum(buf.div_(d).mul_(grad), dims)
        # Then 1 where |t| == s, else 0 (s is the exact max of |t|, so equality finds the peaks).
        peaks = torch.eq(torch.abs(t, out=buf), s, out=buf)
        # At least one peak wherever s > 0; none in an all-zero tensor, whose grad_s is 0.
        share = grad_s / _sum(peaks, dims).clamp_min_(1)
        # dL/dt = share * sign(t) at the peaks + 2 g / d (which is g / s exactly) ...
        grad_t = peaks.copysign_(t).mul_(share).addcdiv_(grad, s)
        # ... times tanh' = 1 - t^2, by the kernel autograd uses for tanh.
        return torch.ops.aten.tanh_backward.grad_input(grad_t, t, grad_input=grad_t), None, None


class _BinaryWeight(torch.autograd.Function):
    """w_q = E * sign(w), E = mean|w| (detached); STE with the gradient clipped to |w| <= 1."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, per_channel: bool) -> torch.Tensor:
        ctx.save_for_backward(w)
        out = w.abs()
        scale = _mean(out, per_channel)  # = binary_weight_scale(w, per_channel)
        # sign(0) is taken as +1 so that exactly two levels exist: 1{w >= 0} * 2 - 1, times E.
        torch.ge(w, 0, out=out)
        return out.mul_(2).sub_(1).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (w,) = ctx.saved_tensors
        inside = w.abs()
        torch.le(inside, 1, out=inside)  # 1.0 where |w| <= 1
        return inside.mul_(grad), None


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
    return _DorefaWeight.apply(w, bits, per_channel)


class _ActQuant(torch.autograd.Function):
    """a_q = Q_k(clamp(x, 0, 1)); gradient 1 inside [0, 1] and 0 outside."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bits: int) -> torch.Tensor:
        levels = (1 << bits) - 1
        out = x.clamp(0, 1)
        if ctx.needs_input_grad[0]:
            # The clamp left x unchanged exactly where 0 <= x <= 1. On the CPU kept as uint8
            # and multiplied (a bool mask multiplies several times slower there); on a GPU
            # kept as bool and selected with where (a uint8 x bf16 product takes CUDA's slow
            # mixed-dtype path).
            inside = torch.eq(out, x)
            ctx.save_for_backward(inside if x.is_cuda else inside.view(torch.uint8))
        return out.mul_(levels).round_().div_(levels)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        if inside.dtype == torch.bool:
            return torch.where(inside, grad, 0), None
        return grad * inside, None


def act_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """k-bit activation quantizer; bits=32 returns the input unchanged."""
    if bits == FULL_PRECISION:
        return x
    return _ActQuant.apply(x, bits)


# --- AQE: the asymptotic-quantized estimator (docs/methods.md, "AQE") ---------------------------


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
        ctx.save_for_backward((x.abs() <= 1).view(torch.uint8))  # uint8: see _ActQuant
        hard = aqe_hard(x, bits, sample_dims)
        if alpha == 1.0:
            return hard
        return alpha * hard + (1.0 - alpha) * x

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return (grad * inside).mul_(2.0 * ctx.alpha), None, None, None


def aqe_quant(x: torch.Tensor, bits: int, alpha: float, per_sample: bool = False) -> torch.Tensor:
    """AQE estimator; bits=32 returns x. ``per_sample`` computes the ternary threshold per sample."""
    if bits == FULL_PRECISION:
        return x
    sample_dims = tuple(range(1, x.dim())) if per_sample and x.dim() > 1 else None
    return _AQE.apply(x, bits, float(alpha), sample_dims)
