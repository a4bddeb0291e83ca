"""LSQ, learned step size quantization (docs/methods.md, "LSQ"; "Learned Step Size
Quantization", arXiv:1902.08153).

    v_q = clamp(round(v / s), -Q_N, Q_P) * s

weights signed (Q_N = 2^(b-1), Q_P = 2^(b-1) - 1), activations unsigned after the ReLU the
quantizer replaces (Q_N = 0, Q_P = 2^b - 1). The step s is a learned parameter, one per layer
(or per output channel of a weight with ``quant.per_channel``), whose gradient is scaled by
g = 1 / sqrt(N Q_P), N the number of values one step quantizes (a weight's elements, per channel
or per tensor; an activation's elements per sample). The rounding is straight-through: dv_q/dv = 1
where round(v / s) lies in [-Q_N, Q_P], else 0; dv_q/ds = round(v / s) - v / s inside, -Q_N below,
Q_P above. v / s is computed as v * (1 / s), and the range test is on the rounded value, as
PyTorch's learnable fake quantizer does (the paper tests v / s itself; the two differ only
within half a step outside the range).

Initialisation (the paper's): s = 2 mean|v| / sqrt(Q_P), from the weights and from the first
training batch's activations (``quant.lsq.init``). The step is learned at the layer's own
bit-width b0 (its target); when the precision controller runs the layer at b bits (progressive,
cyclic), the step used is s * sqrt(Q_P(b0) / Q_P(b)): the ratio the initialisation rule gives,
so a bit-width change rescales the step instead of re-learning it, and no parameter is
rewritten (every rank and every resume agree without communication). 1 bit is refused: the
paper defines 2 bits and up, and its 1-bit signed range {-1, 0} is not a binary quantizer.

Steps have no weight decay. Integer form: the integers are the clamped round(v / s) themselves,
value = integer * s; packed weights are their b-bit two's complement codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from distq.quant.methods.base import ACT, WEIGHT, ActCodes, IntActivation, QuantMethod, WeightCodes, register


@dataclass(kw_only=True)
class LsqConfig:
    grad_scale: bool = True
    """Scale the step's gradient by 1 / sqrt(N Q_P) (the paper's g); false leaves it unscaled."""


def weight_range(bits: int) -> tuple[int, int]:
    """(-Q_N, Q_P) of a signed b-bit step quantizer."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def act_range(bits: int) -> tuple[int, int]:
    return 0, (1 << bits) - 1


# --- the fake quantizer: forward, backward, and its custom operator --------------------------


def _channel_dims(x: Tensor, step: Tensor) -> tuple[int, ...] | None:
    """Dims the step's gradient sums over when the step is per channel (dim 0)."""
    return tuple(range(1, x.dim())) if step.dim() > 0 and step.numel() > 1 else None


def _as_channels(step: Tensor, x: Tensor) -> Tensor:
    return step.view((-1,) + (1,) * (x.dim() - 1)) if step.dim() > 0 and step.numel() > 1 else step.reshape(())


def lsq_forward(x: Tensor, step: Tensor, low: int, high: int) -> Tensor:
    s = _as_channels(step, x)
    return torch.round(x * (1.0 / s)).clamp_(low, high).mul_(s)


def lsq_backward(grad: Tensor, x: Tensor, step: Tensor, low: int, high: int, grad_factor: float) -> tuple[Tensor, Tensor]:
    s = _as_channels(step, x)
    inv = 1.0 / s
    rounded = torch.round(x * inv)
    below, above = rounded < low, rounded > high
    inside = ~(below | above)
    grad_x = grad * inside
    fq = rounded.clamp(low, high).mul_(s)
    per_element = torch.where(below, float(low), torch.where(above, float(high), (fq - x) * inv))
    dims = _channel_dims(x, step)
    grad_s = (grad * per_element).sum() if dims is None else (grad * per_element).sum(dim=dims)
    return grad_x, (grad_s * grad_factor).reshape(step.shape)


class _Lsq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, low: int, high: int, grad_factor: float) -> Tensor:
        ctx.save_for_backward(x, step)
        ctx.range, ctx.grad_factor = (low, high), grad_factor
        return lsq_forward(x, step, low, high)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, step = ctx.saved_tensors
        grad_x, grad_s = lsq_backward(grad, x, step, *ctx.range, ctx.grad_factor)
        return grad_x, grad_s, None, None, None


@torch.library.custom_op("distq::lsq", mutates_args=())
def lsq_op(x: Tensor, step: Tensor, low: int, high: int, grad_factor: float) -> Tensor:
    return lsq_forward(x, step, low, high)


@lsq_op.register_fake
def _(x, step, low, high, grad_factor):
    return torch.empty_like(x)


@torch.library.custom_op("distq::lsq_backward", mutates_args=())
def lsq_backward_op(grad: Tensor, x: Tensor, step: Tensor, low: int, high: int, grad_factor: float) -> tuple[Tensor, Tensor]:
    return lsq_backward(grad, x, step, low, high, grad_factor)


@lsq_backward_op.register_fake
def _(grad, x, step, low, high, grad_factor):
    return torch.empty_like(x), torch.empty_like(step)


def _lsq_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.args = inputs[2:]


def _lsq_op_backward(ctx, grad):
    x, step = ctx.saved_tensors
    grad_x, grad_s = lsq_backward_op(grad, x, step, *ctx.args)
    return grad_x, grad_s, None, None, None


lsq_op.register_autograd(_lsq_op_backward, setup_context=_lsq_setup)


def lsq_quant(x: Tensor, step: Tensor, low: int, high: int, grad_factor: float) -> Tensor:
    """The LSQ fake quantizer: a custom operator inside ``torch.compile``, a plain autograd
    function in eager mode (the operator's dispatch costs more than the arithmetic on CPU)."""
    if torch.compiler.is_compiling():
        return lsq_op(x, step, low, high, grad_factor)
    return _Lsq.apply(x, step, low, high, grad_factor)


# --- the method ------------------------------------------------------------------------------

STEP = {WEIGHT: "weight_step", ACT: "act_step"}
"""The parameter a layer holds its step in, by role."""


@register
class Lsq(QuantMethod):
    key = "lsq"
    config_class = LsqConfig
    min_bits = {WEIGHT: 2, ACT: 2}
    learnable = tuple(STEP.values())
    calibrated = True
    export_version = 2

    def attach(self, layer: nn.Module, role: str) -> None:
        # Shape (1,) for one step: DeepSpeed cannot flatten 0-dim parameters.
        channels = layer.weight.shape[0] if role == WEIGHT and layer.per_channel else 1
        layer.register_parameter(STEP[role], nn.Parameter(torch.ones(channels)))
        layer.step_bits = layer.bits if layer.bits <= 8 else 8
        """b0: the bit-width the step is learned at (the layer's target)."""

    def _range(self, role: str, bits: int) -> tuple[int, int]:
        return weight_range(bits) if role == WEIGHT else act_range(bits)

    def step(self, layer: nn.Module, role: str, bits: int) -> Tensor:
        """The step at ``bits``: the learned one, rescaled from b0 (see the module docstring)."""
        step = getattr(layer, STEP[role])
        if bits == layer.step_bits:
            return step
        ratio = self._range(role, layer.step_bits)[1] / self._range(role, bits)[1]
        return step * math.sqrt(ratio)

    def _grad_factor(self, role: str, bits: int, per_step: int) -> float:
        if not self.cfg.grad_scale:
            return 1.0
        return 1.0 / math.sqrt(per_step * self._range(role, bits)[1])

    def weight(self, layer: nn.Module, w: Tensor, bits: int) -> Tensor:
        self.check_bits(bits, "weight bits", WEIGHT)
        step = self.step(layer, WEIGHT, bits)
        per_step = w.numel() // max(step.numel(), 1)
        return lsq_quant(w, step, *weight_range(bits), self._grad_factor(WEIGHT, bits, per_step))

    def act(self, layer: nn.Module, x: Tensor, bits: int) -> Tensor:
        self.check_bits(bits, "activation bits", ACT)
        per_sample = x[0].numel() if x.dim() > 1 else x.numel()
        return lsq_quant(x, self.step(layer, ACT, bits), *act_range(bits), self._grad_factor(ACT, bits, per_sample))

    def calibrate(self, layer: nn.Module, role: str, inputs: Tensor | None) -> dict[str, Tensor]:
        """sum|v| and the count: per channel for a per-channel weight step; the ReLU's output
        for an activation (what the paper's activation quantizers receive)."""
        if role == WEIGHT:
            w = layer.weight.detach().float().abs()
            if getattr(layer, STEP[role]).numel() > 1:
                flat = w.reshape(w.shape[0], -1)
                return {"sum": flat.sum(dim=1).double(), "count": torch.full((w.shape[0],), flat.shape[1], dtype=torch.float64)}
            return {"sum": w.sum().double().reshape(1), "count": torch.tensor([w.numel()], dtype=torch.float64)}
        a = inputs.detach().float().clamp(min=0)
        return {"sum": a.sum().double().reshape(1), "count": torch.tensor([a.numel()], dtype=torch.float64)}

    def initialise(self, layer: nn.Module, role: str, stats: dict[str, Tensor]) -> None:
        mean = stats["sum"] / stats["count"].clamp(min=1)
        qp = self._range(role, layer.step_bits)[1]
        step = getattr(layer, STEP[role])
        value = (2 * mean / math.sqrt(qp)).clamp(min=1e-8).to(step.dtype)
        with torch.no_grad():
            step.copy_(value.reshape(step.shape))

    def weight_decay(self, name: str, default: float) -> float | None:
        return 0.0 if name in self.learnable else None

    # --- export ---------------------------------------------------------------------------------

    def weight_codes(self, layer: nn.Module) -> WeightCodes:
        bits = layer.bits
        low, high = weight_range(bits)
        with torch.no_grad():
            w = layer.weight.detach().float()
            step = self.step(layer, WEIGHT, bits).detach().float()
            integers = torch.round(w * (1.0 / _as_channels(step, w))).clamp_(low, high).to(torch.int64)
        codes = (integers & ((1 << bits) - 1)).to(torch.uint8)
        return WeightCodes(codes, integers, step.double().reshape(-1), low, high, self.offset_bits(bits))

    def integers(self, codes: Tensor, bits: int) -> Tensor:
        codes = codes.to(torch.int64)
        return torch.where(codes >= (1 << (bits - 1)), codes - (1 << bits), codes)

    def _act_step(self, layer: nn.Module) -> float:
        return float(self.step(layer, ACT, layer.bits).detach().float())

    def act_codes(self, layer: nn.Module) -> ActCodes:
        return ActCodes(layer.bits, self._act_step(layer), act_range(layer.bits)[1])

    def act_record(self, layer: nn.Module) -> dict:
        return {"scale": self._act_step(layer)}

    def int_activation(self, x: Tensor, bits: int, record: dict) -> IntActivation:
        s = torch.tensor(record["scale"], dtype=x.dtype)
        ints = torch.round(x * (1.0 / s)).clamp_(*act_range(bits)).to(torch.uint8)
        return IntActivation(self.int_values(ints, bits, record, x.dtype), ints, ("unsigned", bits), float(s))

    def int_values(self, ints: Tensor, bits: int, record: dict, dtype: torch.dtype) -> Tensor:
        return ints.to(dtype) * torch.tensor(record["scale"], dtype=dtype)
