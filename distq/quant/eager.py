"""The quantizers' forward and backward in plain PyTorch operations (``quant.kernels: torch``).

These are the reference kernels: each forward writes its result into one buffer (every step
after the first in place, with exactly the float operations of the formula), and each backward
is written out by hand from what the forward returned, never from a recorded graph. On the CPU
a fresh large tensor costs more than the arithmetic (its pages are faulted in on first write),
so the fewer buffers the faster. On fp32 CPU tensors the activation quantizer, the masked
gradient and the DoReFa weight quantizer's elementwise passes run as native loops where distq's
library loads (``native_cpu``: bit-identical; ``act_forward_torch``, ``masked_grad_torch``,
``dorefa_quantize_torch`` and ``dorefa_backward_torch`` stay the reference, which each loop checks
itself against at its first use; ``DISTQ_NATIVE=0`` keeps them).
``distq.quant.ops`` registers them, with the Triton kernels of
``distq.quant.triton_kernels``, as PyTorch custom operators.
"""

from __future__ import annotations

import torch

from distq.quant import native_cpu


def reduce_dims(w: torch.Tensor, per_channel: bool) -> tuple[int, ...] | None:
    return tuple(range(1, w.dim())) if per_channel and w.dim() > 1 else None


def mean(t: torch.Tensor, dims: tuple[int, ...] | None) -> torch.Tensor:
    return t.mean() if dims is None else t.mean(dim=dims, keepdim=True)


def _sum(t: torch.Tensor, dims: tuple[int, ...] | None) -> torch.Tensor:
    return t.sum() if dims is None else t.sum(dim=dims, keepdim=True)


def _max_abs(t: torch.Tensor, dims: tuple[int, ...] | None) -> torch.Tensor:
    """max|t| over the whole tensor, or over ``dims`` (kept as size-1 dims)."""
    if dims is None:
        low, high = torch.aminmax(t)  # one pass, no |t| buffer
        return torch.maximum(high, -low)
    return t.abs().amax(dim=dims, keepdim=True)  # aminmax along a dim is slower than this on CPU


# --- k-bit activations: Q_k(clamp(x, 0, 1)); gradient 1 inside [0, 1] -----------------------


def act_forward(x: torch.Tensor, bits: int, need_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_q, mask): mask is 1 (uint8) where the clamp left x unchanged, empty if not needed.
    On the CPU one native loop where it can run (``distq.quant.native_cpu``: the same bits)."""
    return native_cpu.act_forward(x, bits, need_mask) or act_forward_torch(x, bits, need_mask)


def act_forward_torch(x: torch.Tensor, bits: int, need_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``act_forward`` in PyTorch operations: the reference."""
    levels = (1 << bits) - 1
    out = x.clamp(0, 1)
    mask = torch.eq(out, x).view(torch.uint8) if need_mask else x.new_empty((0,), dtype=torch.uint8)
    return out.mul_(levels).round_().div_(levels), mask


def masked_grad(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """grad where mask is 1, else 0; on the CPU one native loop where it can run."""
    out = native_cpu.masked_grad(grad, mask)
    return out if out is not None else masked_grad_torch(grad, mask)


def masked_grad_torch(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``masked_grad`` in PyTorch operations. On the CPU a uint8 product (a bool mask multiplies several
    times slower there); on a GPU a select (a uint8 x bf16 product takes CUDA's slow mixed-dtype path)."""
    if grad.is_cuda:
        return torch.where(mask.view(torch.bool), grad, 0)
    return grad * mask


# --- DoReFa k-bit weights (k >= 2): 2 Q_k(tanh(w) / (2 s) + 1/2) - 1, s = max|tanh w| ----------


def dorefa_forward(w: torch.Tensor, bits: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w_q, t, s) with t = tanh(w) and s the scale (per layer: 0-dim; per channel: keepdim).

    An all-zero tensor (or channel) has s = 0: s = 1 is taken there, so that it quantizes to
    the level nearest 0 instead of 0 / 0 = NaN (t / s is 0 either way)."""
    t = torch.tanh(w)
    s = _max_abs(t, reduce_dims(w, per_channel))
    s = s.masked_fill(s == 0, 1.0)
    q = native_cpu.dorefa_forward(t, s, bits, per_channel)
    return (q if q is not None else dorefa_quantize_torch(t, s, bits)), t, s


def dorefa_quantize_torch(t: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """``dorefa_forward``'s q from t and s in PyTorch operations: the reference of its native loop."""
    levels = (1 << bits) - 1
    q = t / (2 * s)
    # round(...) / levels * 2 - 1, with "/ levels * 2" as one exact "/ (levels / 2)".
    q.add_(0.5).mul_(levels).round_().div_(levels / 2).sub_(1)
    return q


def dorefa_backward(grad: torch.Tensor, t: torch.Tensor, s: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """The gradient autograd gives for the formula with the rounding straight through.

    It goes through t / (2 s) directly, and through s, whose gradient autograd's amax splits
    equally among the elements where |t| == s (with the sign of t, from abs); then
    tanh' = 1 - t^2. One buffer, reused in place step by step."""
    out = native_cpu.dorefa_backward(grad, t, s, per_channel)  # the same values, two passes instead of eight
    return out if out is not None else dorefa_backward_torch(grad, t, s, per_channel)


def dorefa_backward_torch(grad: torch.Tensor, t: torch.Tensor, s: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``dorefa_backward`` in PyTorch operations: the reference."""
    dims = reduce_dims(t, per_channel)
    d = 2 * s
    # dL/ds = 2 dL/dd, dL/dd = sum(-2 g (t / d) / d) (the upstream of t / d is 2 g, from 2 Q - 1).
    buf = t / d
    grad_s = -4 * _sum(buf.div_(d).mul_(grad), dims)
    # 1 where |t| == s, else 0 (s is the exact max of |t|, so equality finds the peaks).
    peaks = torch.eq(torch.abs(t, out=buf), s, out=buf)
    # At least one peak wherever s > 0; none in an all-zero tensor, whose grad_s is 0.
    share = grad_s / _sum(peaks, dims).clamp_min_(1)
    # dL/dt = share * sign(t) at the peaks + 2 g / d (which is g / s exactly) ...
    grad_t = peaks.copysign_(t).mul_(share).addcdiv_(grad, s)
    # ... times tanh' = 1 - t^2, by the kernel autograd uses for tanh.
    return torch.ops.aten.tanh_backward.grad_input(grad_t, t, grad_input=grad_t)


# --- binary weights: E sign(w), E = mean|w|; STE clipped to |w| <= 1 ------------------------


def binary_scale(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    return mean(w.abs(), reduce_dims(w, per_channel))


def binary_forward(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    out = w.abs()
    scale = mean(out, reduce_dims(w, per_channel))  # = binary_scale(w, per_channel)
    # sign(0) is taken as +1 so that exactly two levels exist: 1{w >= 0} * 2 - 1, times E.
    torch.ge(w, 0, out=out)
    return out.mul_(2).sub_(1).mul_(scale)


def inside_unit(x: torch.Tensor) -> torch.Tensor:
    """1 (uint8) where |x| <= 1: the straight-through window of binary weights and AQE."""
    return (x.abs() <= 1).view(torch.uint8)


# --- AQE: alpha h(x) + (1 - alpha) x; gradient 2 alpha g where |x| <= 1 ------------------------


def pow2_magnitudes(bits: int) -> list[float]:
    """Non-zero magnitudes of the n >= 3 bit AQE quantizer: 1, 1/2, ..., 2^-(2^(n-1)-2)."""
    return [2.0**-p for p in range((1 << (bits - 1)) - 1)]


def aqe_threshold(x: torch.Tensor, sample_dims: tuple[int, ...] | None) -> torch.Tensor:
    """The 2-bit (ternary) threshold Delta = 0.5 mean|x|, over the tensor or per sample."""
    return 0.5 * mean(x.abs(), sample_dims)


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
        return torch.sign(x) * (x.abs() > aqe_threshold(x, sample_dims)).to(x.dtype)
    levels = pow2_magnitudes(bits)
    mag = x.abs().clamp(max=1.0)
    out = torch.zeros_like(mag)
    # Walk the levels from the smallest up; each midpoint crossed lifts |x| to that level.
    below = 0.0
    for level in reversed(levels):
        out = torch.where(mag >= (below + level) / 2, torch.full_like(mag, level), out)
        below = level
    return torch.sign(x) * out


def aqe_forward(x: torch.Tensor, bits: int, alpha: float, sample_dims: tuple[int, ...] | None) -> torch.Tensor:
    hard = aqe_hard(x, bits, sample_dims)
    if alpha == 1.0:
        return hard
    return alpha * hard + (1.0 - alpha) * x


# The PyTorch passes the native loops check themselves against at their first use (native_cpu
# does not import this module).
native_cpu.REFERENCES.update(act_quant=act_forward_torch, masked_grad=masked_grad_torch, dorefa_forward=dorefa_quantize_torch,
                             dorefa_backward=dorefa_backward_torch)  # fmt: skip
