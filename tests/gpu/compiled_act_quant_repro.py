"""Standalone reproduction of the zero gradient of the compiled activation quantizer on CUDA.

    python tests/gpu/compiled_act_quant_repro.py      # needs a CUDA GPU; imports nothing from distq

On an H200 (torch 2.11, 2026-11-30) the activation quantizer that distq then used, compiled with
torch.compile, returned an all-zero input gradient on CUDA (a compiled W4A4 ResNet-50 left 157
parameters without gradient) while eager CUDA and compiled CPU were exact. That quantizer was an
``autograd.Function`` whose forward (1) compared the clamped tensor with the input to build the
straight-through mask, (2) then rounded the same clamped tensor *in place*, and (3) saved the mask
as a bool tensor on CUDA (as uint8 on the CPU), selected with ``torch.where`` in the backward.

The variants below each remove one of those ingredients; the script prints, per variant and
dtype, whether the compiled gradient equals the eager one. The suspect is (1)+(2): a compiled
graph that evaluates the comparison after the in-place update of the tensor it reads sees
round(x * L) / L == x, false almost everywhere, hence an all-zero mask. distq no longer uses the
pattern: its quantizers are custom operators (distq/quant/ops.py) whose mask is an output of the
operator, which the compiler never looks inside. Run this on the next GPU machine
(benchmarks/gpu_all.sh does) and record which variants fail in BENCHMARKS.md.
"""

from __future__ import annotations

import torch

LEVELS = 15


class InPlaceBoolMask(torch.autograd.Function):
    """The old quantizer: mask from the clamp, then the clamp's buffer rounded in place."""

    @staticmethod
    def forward(ctx, x):
        out = x.clamp(0, 1)
        ctx.save_for_backward(torch.eq(out, x))
        return out.mul_(LEVELS).round_().div_(LEVELS)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, 0)


class OutOfPlaceBoolMask(torch.autograd.Function):
    """Without (2): the rounding makes new tensors."""

    @staticmethod
    def forward(ctx, x):
        out = x.clamp(0, 1)
        ctx.save_for_backward(torch.eq(out, x))
        return torch.round(out * LEVELS) / LEVELS

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, 0)


class InPlaceUint8Mask(torch.autograd.Function):
    """Without (3): the mask as uint8, multiplied (the CPU path, which compiled correctly)."""

    @staticmethod
    def forward(ctx, x):
        out = x.clamp(0, 1)
        ctx.save_for_backward(torch.eq(out, x).view(torch.uint8))
        return out.mul_(LEVELS).round_().div_(LEVELS)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside


class MaskFromInput(torch.autograd.Function):
    """Without (1): the mask from the input alone, before any buffer is shared."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward((x >= 0) & (x <= 1))
        return x.clamp(0, 1).mul_(LEVELS).round_().div_(LEVELS)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, 0)


def gradient(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    fn(x).square().sum().backward()
    return x.grad


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    for dtype in (torch.float32, torch.bfloat16):
        x = (1.5 * torch.randn(64, 256, 14, 14, device="cuda") + 0.4).to(dtype)
        for variant in (InPlaceBoolMask, OutOfPlaceBoolMask, InPlaceUint8Mask, MaskFromInput):
            torch._dynamo.reset()
            eager = gradient(variant.apply, x)
            compiled = gradient(torch.compile(variant.apply), x)
            same = torch.equal(eager, compiled)
            zero = bool((compiled == 0).all())
            print(f"{variant.__name__:20s} {str(dtype):15s} compiled == eager: {same}   all-zero compiled gradient: {zero}")


if __name__ == "__main__":
    main()
