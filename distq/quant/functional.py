"""The quantizers' public functions (docs/methods.md, "Quantizers").

The activation quantizer Q_k(clamp(x, 0, 1)) with the straight-through estimator inside
[0, 1]; DoReFa k-bit weights 2 Q_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1, differentiated through
tanh and the normalisation; binary weights mean|w| sign(w), straight-through where |w| <= 1;
and AQE. ``kernels`` (``quant.kernels``) picks the fused Triton kernels or the plain PyTorch
ones (``distq.quant.eager``): ``auto`` takes Triton for CUDA tensors. Both give the same
outputs to the bit. A Triton kernel checks itself at its first use and, under ``auto``, falls
back to the PyTorch kernel where it fails or disagrees (``distq.quant.kernel_check``);
``triton`` (strict) raises there instead.

Each quantizer is a PyTorch custom operator (``distq.quant.ops``), which is what runs with the
Triton kernels and whenever ``torch.compile`` traces a model (the compiler keeps it whole).
Eager PyTorch kernels outside a compiled region go through a plain ``autograd.Function``
around the same functions instead: the custom operator's dispatch costs about 0.1 ms per call
on the CPU, 8% of a digits-sized training step there.

Bit-width conventions: ``bits`` is an int in 1..8, or 32 meaning "full
precision" (the input is returned unchanged).
"""

from __future__ import annotations

import torch

from distq.quant import eager
from distq.quant.eager import aqe_hard, pow2_magnitudes
from distq.quant.ops import KERNELS, act_quant_op, aqe_op, binary_weight_op, dorefa_weight_op, kernels_for

FULL_PRECISION = 32
VALID_BITS = (1, 2, 3, 4, 5, 6, 7, 8, FULL_PRECISION)

__all__ = ["FULL_PRECISION", "KERNELS", "VALID_BITS", "act_quant", "aqe_hard", "aqe_quant", "binary_weight_scale",
           "check_bits", "pow2_magnitudes", "quantize_unit", "weight_quant"]  # fmt: skip


def check_bits(bits: int, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise ValueError(f"{what}={bits!r} is not a valid bit-width: use 1..8, or 32 for full precision")
    return bits


def quantize_unit(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Q_k(z) = round((2^k - 1) z) / (2^k - 1) for z in [0, 1], with no gradient handling."""
    levels = (1 << bits) - 1
    return torch.round(z * levels) / levels


def _needs_grad(x: torch.Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


def _as_operator(use_triton: bool) -> bool:
    return use_triton or torch.compiler.is_compiling()


class _ActQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bits: int) -> torch.Tensor:
        out, mask = eager.act_forward(x, bits, ctx.needs_input_grad[0])
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return eager.masked_grad(grad, mask), None


class _DorefaWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
        q, t, s = eager.dorefa_forward(w, bits, per_channel)
        ctx.per_channel = per_channel
        ctx.save_for_backward(t, s)
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        t, s = ctx.saved_tensors
        return eager.dorefa_backward(grad, t, s, ctx.per_channel), None, None


class _BinaryWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, per_channel: bool) -> torch.Tensor:
        ctx.save_for_backward(w)
        return eager.binary_forward(w, per_channel)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (w,) = ctx.saved_tensors
        return eager.masked_grad(grad, eager.inside_unit(w)), None


class _AQE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bits: int, alpha: float, per_sample: bool) -> torch.Tensor:
        ctx.alpha = alpha
        ctx.save_for_backward(eager.inside_unit(x))
        return eager.aqe_forward(x, bits, alpha, tuple(range(1, x.dim())) if per_sample and x.dim() > 1 else None)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return eager.masked_grad(grad, inside).mul_(2.0 * ctx.alpha), None, None, None


def binary_weight_scale(w: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """E = mean|w| of the binary weight quantizer, shared with the exporter."""
    return eager.binary_scale(w, per_channel)


def weight_quant(w: torch.Tensor, bits: int, per_channel: bool = False, kernels: str = "auto") -> torch.Tensor:
    """DoReFa-style weight quantizer.

    k >= 2: ``2 * Q_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1``; the gradient flows through
    tanh and the normalisation, only the rounding is straight-through.
    k == 1: ``mean|w| * sign(w)``.  k == 32: ``w`` unchanged.
    """
    if bits == FULL_PRECISION:
        return w
    use_triton = kernels_for(w, kernels)
    if bits == 1:
        return binary_weight_op(w, per_channel, use_triton, kernels == "triton") if _as_operator(use_triton) else _BinaryWeight.apply(w, per_channel)
    if _as_operator(use_triton):
        return dorefa_weight_op(w, bits, per_channel, use_triton, kernels == "triton")[0]
    return _DorefaWeight.apply(w, bits, per_channel)


def act_quant(x: torch.Tensor, bits: int, kernels: str = "auto") -> torch.Tensor:
    """k-bit activation quantizer; bits=32 returns the input unchanged."""
    if bits == FULL_PRECISION:
        return x
    use_triton = kernels_for(x, kernels)
    if _as_operator(use_triton):
        return act_quant_op(x, bits, _needs_grad(x), use_triton, kernels == "triton")[0]
    return _ActQuant.apply(x, bits)


# --- AQE: the asymptotic-quantized estimator (docs/methods.md, "AQE") ---------------------------


def aqe_quant(x: torch.Tensor, bits: int, alpha: float, per_sample: bool = False, kernels: str = "auto") -> torch.Tensor:
    """AQE estimator: alpha h(x) + (1 - alpha) x, gradient 2 alpha g where |x| <= 1; bits=32
    returns x. ``per_sample`` computes the ternary threshold per sample."""
    if bits == FULL_PRECISION:
        return x
    use_triton = kernels_for(x, kernels)
    if _as_operator(use_triton):
        return aqe_op(x, bits, float(alpha), per_sample, _needs_grad(x), use_triton, kernels == "triton")[0]
    return _AQE.apply(x, bits, float(alpha), per_sample)
