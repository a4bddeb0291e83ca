"""PACT, parameterized clipping activation (docs/methods.md, "PACT"; "PACT: Parameterized
Clipping Activation for Quantized Neural Networks", arXiv:1805.06085).

Each quantized activation has a learned clipping level alpha in place of the ReLU:

    y = clamp(x, 0, alpha),   y_q = round(y * L / alpha) * (alpha / L),   L = 2^k - 1

with the rounding straight-through: dy_q/dx = 1 for 0 <= x < alpha, else 0; dy_q/dalpha = 1 for
x >= alpha, else 0 (the paper's equation 3). alpha has the paper's L2 penalty lambda alpha^2,
applied as weight decay on alpha alone (``quant.pact.alpha_decay``: the gradient it adds is
decay * alpha). Weights are DoReFa's, as in the paper. alpha is a clipping level, the same at
every bit-width, so a bit-width change leaves it as it is.

Integer form: an activation's integer is round(clamp(x, 0, alpha) * L / alpha) in [0, L], value
integer * (alpha / L); weights as DoReFa's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from distq.quant.methods.base import ACT, WEIGHT, ActCodes, IntActivation, register
from distq.quant.methods.dorefa import DoReFa, levels


@dataclass(kw_only=True)
class PactConfig:
    alpha_init: float = 10.0
    """First value of every clipping level alpha (the paper's 10)."""
    alpha_decay: float = 0.0002
    """Weight decay on alpha, the paper's L2 penalty lambda (its ImageNet value, 0.0002)."""

    def __post_init__(self):
        if not self.alpha_init > 0:
            raise ValueError(f"quant.pact.alpha_init={self.alpha_init!r} must be > 0")
        if not self.alpha_decay >= 0:
            raise ValueError(f"quant.pact.alpha_decay={self.alpha_decay!r} must be >= 0")


def pact_forward(x: Tensor, alpha: Tensor, bits: int) -> Tensor:
    n = levels(bits)
    a = alpha.reshape(())
    return torch.round(torch.minimum(x.clamp(min=0), a) * (n / a)).mul_(a / n)


def pact_backward(grad: Tensor, x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    a = alpha.reshape(())
    above = x >= a
    grad_x = grad * ((x >= 0) & ~above)
    return grad_x, (grad * above).sum().reshape(alpha.shape)


class _Pact(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, bits: int) -> Tensor:
        ctx.save_for_backward(x, alpha)
        return pact_forward(x, alpha, bits)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, alpha = ctx.saved_tensors
        return *pact_backward(grad, x, alpha), None


@torch.library.custom_op("distq::pact", mutates_args=())
def pact_op(x: Tensor, alpha: Tensor, bits: int) -> Tensor:
    return pact_forward(x, alpha, bits)


@pact_op.register_fake
def _(x, alpha, bits):
    return torch.empty_like(x)


@torch.library.custom_op("distq::pact_backward", mutates_args=())
def pact_backward_op(grad: Tensor, x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    return pact_backward(grad, x, alpha)


@pact_backward_op.register_fake
def _(grad, x, alpha):
    return torch.empty_like(x), torch.empty_like(alpha)


def _pact_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])


def _pact_op_backward(ctx, grad):
    return *pact_backward_op(grad, *ctx.saved_tensors), None


pact_op.register_autograd(_pact_op_backward, setup_context=_pact_setup)


def pact_quant(x: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """The PACT activation quantizer (a custom operator inside ``torch.compile``)."""
    if torch.compiler.is_compiling():
        return pact_op(x, alpha, bits)
    return _Pact.apply(x, alpha, bits)


@register
class Pact(DoReFa):
    key = "pact"
    config_class = PactConfig
    learnable = ("act_clip",)
    export_version = 2
    min_bits = {WEIGHT: 1, ACT: 2}
    """1-bit activations are refused: the paper defines 2 bits and up, and from its start alpha = 10
    a 1-bit activation is 0 below 5, which silences a batch-normalised network entirely."""

    def attach(self, layer: nn.Module, role: str) -> None:
        if role == ACT:
            # Shape (1,): DeepSpeed cannot flatten 0-dim parameters.
            layer.register_parameter("act_clip", nn.Parameter(torch.full((1,), float(self.cfg.alpha_init))))

    def act(self, layer: nn.Module, x: Tensor, bits: int) -> Tensor:
        return pact_quant(x, layer.act_clip, bits)

    def weight_decay(self, name: str, default: float) -> float | None:
        return self.cfg.alpha_decay if name == "act_clip" else None

    # --- export (weights: DoReFa's) ----------------------------------------------------------

    def _alpha(self, layer: nn.Module) -> float:
        return float(layer.act_clip.detach().float())

    def act_codes(self, layer: nn.Module) -> ActCodes:
        return ActCodes(layer.bits, float(torch.tensor(self._alpha(layer)) / levels(layer.bits)), levels(layer.bits))

    def act_record(self, layer: nn.Module) -> dict:
        return {"alpha": self._alpha(layer)}

    def int_activation(self, x: Tensor, bits: int, record: dict) -> IntActivation:
        n = levels(bits)
        a = torch.tensor(record["alpha"], dtype=x.dtype)
        ints = torch.round(torch.minimum(x.clamp(min=0), a) * (n / a)).to(torch.uint8)
        return IntActivation(self.int_values(ints, bits, record, x.dtype), ints, ("unsigned", bits), float(a / n))

    def int_values(self, ints: Tensor, bits: int, record: dict, dtype: torch.dtype) -> Tensor:
        a = torch.tensor(record["alpha"], dtype=dtype)
        return ints.to(dtype) * (a / levels(bits))

    def unit_levels(self, bits: int) -> int | None:
        return None
