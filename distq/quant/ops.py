"""The quantizers as PyTorch custom operators (``torch.ops.distq.*``).

Every quantizer is a forward operator and a backward operator, with registered autograd
and fake (meta) implementations: ``torch.compile`` traces them as single opaque nodes and
never rewrites their insides, and each can be checked with ``torch.library.opcheck``. The
``use_triton`` argument picks the implementation: the fused Triton kernels
(``distq.quant.triton_kernels``, one kernel per pass) or the plain PyTorch ones
(``distq.quant.eager``). ``kernels_for`` turns the ``quant.kernels`` setting into it:
``auto`` is Triton on CUDA tensors and PyTorch elsewhere (the CPU's eager code is as fast as
the fused one there); ``triton`` runs the kernels on any device (on the CPU under
``TRITON_INTERPRET=1``: that is how the tests check them without a GPU).

Each Triton kernel checks itself against the PyTorch kernel at its first use
(``distq.quant.kernel_check``): one that fails or disagrees falls back to the PyTorch kernel
with one line on stderr, or with ``strict`` (``quant.kernels=triton``) raises ``DistqError``.

What each backward keeps: the activation quantizer a byte per element (whether the clamp
left x unchanged); DoReFa weights tanh(w) and the scale; binary weights and AQE their input.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from distq.quant import eager
from distq.quant.kernel_check import triton_agrees

KERNELS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float32, torch.bfloat16)  # others (fp16, fp64) take the PyTorch kernels


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernels_for(x: Tensor, kernels: str) -> bool:
    """Whether ``x`` goes through the Triton kernels under ``quant.kernels=kernels``."""
    if kernels == "torch" or x.dtype not in TRITON_DTYPES:
        return False
    if kernels == "triton":
        if not triton_available():
            raise RuntimeError("quant.kernels=triton needs the triton package: install it, or set quant.kernels=auto")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("quant.kernels=triton on the CPU runs only under TRITON_INTERPRET=1 (for tests): use quant.kernels=auto")
        return True
    if x.is_cuda:
        return triton_available()
    return triton_on_cpu() and triton_available()


TRITON_ON_CPU = "DISTQ_TRITON_ON_CPU"
"""Test only: DISTQ_TRITON_ON_CPU=1 with TRITON_INTERPRET=1 makes ``auto`` pick the Triton kernels
for CPU tensors too (under the interpreter: slow), so that the tests exercise ``auto``'s
first-use check and fallback (``distq.quant.kernel_check``) without a GPU."""


def triton_on_cpu() -> bool:
    return os.environ.get(TRITON_ON_CPU) == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def _triton():
    from distq.quant import triton_kernels

    return triton_kernels


# --- activations ---------------------------------------------------------------------------


@torch.library.custom_op("distq::act_quant", mutates_args=())
def act_quant_op(x: Tensor, bits: int, need_mask: bool, use_triton: bool, strict: bool = False) -> tuple[Tensor, Tensor]:
    if use_triton and triton_agrees("act_quant", x, strict):
        return _triton().act_quant_forward(x, bits, need_mask)
    return eager.act_forward(x, bits, need_mask)


@act_quant_op.register_fake
def _(x, bits, need_mask, use_triton, strict=False):
    return torch.empty_like(x), x.new_empty(x.shape if need_mask else (0,), dtype=torch.uint8)


@torch.library.custom_op("distq::masked_grad", mutates_args=())
def masked_grad_op(grad: Tensor, mask: Tensor, use_triton: bool, strict: bool = False) -> Tensor:
    if use_triton and triton_agrees("masked_grad", grad, strict):
        return _triton().masked_grad(grad, mask)
    return eager.masked_grad(grad, mask)


@masked_grad_op.register_fake
def _(grad, mask, use_triton, strict=False):
    return torch.empty_like(grad)


def _act_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero gradients made for the mask output
    ctx.save_for_backward(output[1])
    ctx.use_triton, ctx.strict = inputs[3], inputs[4]


def _act_backward(ctx, grad, _mask_grad):
    (mask,) = ctx.saved_tensors
    return masked_grad_op(grad, mask, ctx.use_triton, ctx.strict), None, None, None, None


act_quant_op.register_autograd(_act_backward, setup_context=_act_setup)


# --- DoReFa weights --------------------------------------------------------------------------


@torch.library.custom_op("distq::dorefa_weight", mutates_args=())
def dorefa_weight_op(w: Tensor, bits: int, per_channel: bool, use_triton: bool, strict: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    if use_triton and triton_agrees("dorefa_weight", w, strict):
        t = torch.tanh(w)  # PyTorch's tanh: part of the reference (and the interpreter has none)
        q, s = _triton().dorefa_forward(t, bits, per_channel)
        return q, t, s
    return eager.dorefa_forward(w, bits, per_channel)


@dorefa_weight_op.register_fake
def _(w, bits, per_channel, use_triton, strict=False):
    scale = (w.shape[0],) + (1,) * (w.dim() - 1) if per_channel and w.dim() > 1 else ()
    return torch.empty_like(w), torch.empty_like(w), w.new_empty(scale)


@torch.library.custom_op("distq::dorefa_weight_backward", mutates_args=())
def dorefa_weight_backward_op(grad: Tensor, t: Tensor, s: Tensor, per_channel: bool, use_triton: bool, strict: bool = False) -> Tensor:
    if use_triton and triton_agrees("dorefa_weight_backward", grad, strict):
        return _triton().dorefa_backward(grad, t, s, per_channel)
    return eager.dorefa_backward(grad, t, s, per_channel)


@dorefa_weight_backward_op.register_fake
def _(grad, t, s, per_channel, use_triton, strict=False):
    return torch.empty_like(grad)


def _dorefa_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero gradients made for the t and s outputs
    ctx.save_for_backward(output[1], output[2])
    ctx.per_channel, ctx.use_triton, ctx.strict = inputs[2], inputs[3], inputs[4]


def _dorefa_backward(ctx, grad, _t_grad, _s_grad):
    t, s = ctx.saved_tensors
    return dorefa_weight_backward_op(grad, t, s, ctx.per_channel, ctx.use_triton, ctx.strict), None, None, None, None


dorefa_weight_op.register_autograd(_dorefa_backward, setup_context=_dorefa_setup)


# --- binary weights ---------------------------------------------------------------------------


@torch.library.custom_op("distq::binary_weight", mutates_args=())
def binary_weight_op(w: Tensor, per_channel: bool, use_triton: bool, strict: bool = False) -> Tensor:
    if use_triton and triton_agrees("binary_weight", w, strict):
        return _triton().binary_forward(w, eager.binary_scale(w, per_channel))  # the mean's sum order: PyTorch's
    return eager.binary_forward(w, per_channel)


@binary_weight_op.register_fake
def _(w, per_channel, use_triton, strict=False):
    return torch.empty_like(w)


@torch.library.custom_op("distq::inside_unit", mutates_args=())
def inside_unit_op(x: Tensor, use_triton: bool, strict: bool = False) -> Tensor:
    if use_triton and triton_agrees("inside_unit", x, strict):
        return _triton().inside_unit(x)
    return eager.inside_unit(x)


@inside_unit_op.register_fake
def _(x, use_triton, strict=False):
    return torch.empty_like(x, dtype=torch.uint8)


def _binary_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.use_triton, ctx.strict = inputs[2], inputs[3]


def _binary_backward(ctx, grad):
    (w,) = ctx.saved_tensors
    return masked_grad_op(grad, inside_unit_op(w, ctx.use_triton, ctx.strict), ctx.use_triton, ctx.strict), None, None, None


binary_weight_op.register_autograd(_binary_backward, setup_context=_binary_setup)


# --- AQE ------------------------------------------------------------------------------------


def _sample_dims(x: Tensor, per_sample: bool) -> tuple[int, ...] | None:
    return tuple(range(1, x.dim())) if per_sample and x.dim() > 1 else None


@torch.library.custom_op("distq::aqe", mutates_args=())
def aqe_op(x: Tensor, bits: int, alpha: float, per_sample: bool, need_mask: bool, use_triton: bool, strict: bool = False) -> tuple[Tensor, Tensor]:
    """(alpha h(x) + (1 - alpha) x, 1 where |x| <= 1 as uint8 or empty)."""
    dims = _sample_dims(x, per_sample)
    if use_triton and triton_agrees("aqe", x, strict, bits):
        threshold = eager.aqe_threshold(x, dims) if bits == 2 else None  # the mean's sum order: PyTorch's
        return _triton().aqe_forward(x, bits, alpha, threshold, need_mask)
    mask = eager.inside_unit(x) if need_mask else x.new_empty((0,), dtype=torch.uint8)
    return eager.aqe_forward(x, bits, alpha, dims), mask


@aqe_op.register_fake
def _(x, bits, alpha, per_sample, need_mask, use_triton, strict=False):
    return torch.empty_like(x), x.new_empty(x.shape if need_mask else (0,), dtype=torch.uint8)


@torch.library.custom_op("distq::aqe_backward", mutates_args=())
def aqe_backward_op(grad: Tensor, mask: Tensor, alpha: float, use_triton: bool, strict: bool = False) -> Tensor:
    """2 alpha g where |x| <= 1: (g masked) x (2 alpha), the eager code's two roundings."""
    return masked_grad_op(grad, mask, use_triton, strict).mul_(2.0 * alpha)


@aqe_backward_op.register_fake
def _(grad, mask, alpha, use_triton, strict=False):
    return torch.empty_like(grad)


def _aqe_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])
    ctx.alpha, ctx.use_triton, ctx.strict = inputs[2], inputs[5], inputs[6]


def _aqe_backward(ctx, grad, _mask_grad):
    (mask,) = ctx.saved_tensors
    return aqe_backward_op(grad, mask, ctx.alpha, ctx.use_triton, ctx.strict), None, None, None, None, None, None


aqe_op.register_autograd(_aqe_backward, setup_context=_aqe_setup)
