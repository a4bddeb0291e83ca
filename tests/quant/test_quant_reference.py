"""The fused quantizers of ``distq.quant.functional`` against a plain autograd reference.

The references below are the formulas of docs/methods.md ("Quantizers") written the obvious way, with
autograd differentiating everything but the rounding (and, for 1-bit weights, the sign).
The fused versions must give the same outputs and the same gradients, bit for bit: they
perform the same float operations, only in fewer buffers. Checked for bits 1..8, per-layer
and per-channel scales, in float32 (what training uses) and float64, on random tensors and
on the edge cases (ties at the maximum, saturated tanh, exact 0 and 1, negative zero).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from distq.quant.functional import act_quant, aqe_quant, weight_quant
from distq.quant.layers import QAct, QConv2d

BITS = range(1, 9)
DTYPES = (torch.float32, torch.float64)
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ("cpu", pytest.param("cuda", marks=[pytest.mark.gpu, NO_CUDA]))  # `pytest -m gpu` runs the CUDA cases


# --- the references -------------------------------------------------------------------


class RoundSTE(torch.autograd.Function):
    """Q_k(z) = round((2^k - 1) z) / (2^k - 1), identity gradient."""

    @staticmethod
    def forward(ctx, z, bits):
        levels = 2**bits - 1
        return torch.round(z * levels) / levels

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class BinaryClippedSTE(torch.autograd.Function):
    """E sign(w) with sign(0) = +1, E given; the whole map is straight-through where |w| <= 1."""

    @staticmethod
    def forward(ctx, w, mean_abs):
        ctx.save_for_backward(w)
        return torch.where(w >= 0, mean_abs, -mean_abs)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype), None


def ref_weight(w: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    dims = tuple(range(1, w.dim())) if per_channel and w.dim() > 1 else None
    if bits == 1:
        mean_abs = w.abs().mean() if dims is None else w.abs().mean(dim=dims, keepdim=True)
        return BinaryClippedSTE.apply(w, mean_abs.detach())
    t = torch.tanh(w)
    max_abs = t.abs().amax() if dims is None else t.abs().amax(dim=dims, keepdim=True)
    return 2 * RoundSTE.apply(t / (2 * max_abs) + 0.5, bits) - 1


class ClampUnit(torch.autograd.Function):
    """clamp(x, 0, 1) with gradient 1 on the closed interval [0, 1] (torch.clamp's own
    backward is 0 at the ends)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.clamp(x, 0, 1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * ((x >= 0) & (x <= 1)).to(grad.dtype)


def ref_act(x: torch.Tensor, bits: int) -> torch.Tensor:
    return RoundSTE.apply(ClampUnit.apply(x), bits)


def ref_aqe_hard(x: torch.Tensor, bits: int, per_sample: bool) -> torch.Tensor:
    """h in float64 numpy: sign; ternary at 0.5 mean|x|; nearest power of two (ties up)."""
    a = x.detach().double().numpy()
    if bits == 1:
        h = np.where(a >= 0, 1.0, -1.0)
    elif bits == 2:
        axes = tuple(range(1, a.ndim)) if per_sample and a.ndim > 1 else None
        mean = x.detach().abs().mean(dim=axes, keepdim=True) if axes else x.detach().abs().mean()
        h = np.sign(a) * (np.abs(a) > 0.5 * mean.double().numpy())
    else:
        cands = np.array([2.0**-p for p in range(2 ** (bits - 1) - 1)] + [0.0])  # largest first
        mag = np.minimum(np.abs(a), 1.0)[..., None]
        h = np.sign(a) * cands[np.argmin(np.abs(mag - cands), axis=-1)]  # first minimum: the larger
    return torch.from_numpy(np.asarray(h)).to(x.dtype)


class RefAQE(torch.autograd.Function):
    """alpha h(x) + (1 - alpha) x forward; 2 alpha g 1{|x| <= 1} backward."""

    @staticmethod
    def forward(ctx, x, bits, alpha, per_sample):
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return alpha * ref_aqe_hard(x, bits, per_sample) + (1 - alpha) * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * ctx.alpha * grad * (x.abs() <= 1).to(grad.dtype), None, None, None


# --- helpers --------------------------------------------------------------------------


def value_and_grad(fn, x: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    y.backward(upstream)
    return y.detach(), x.grad


def assert_same(fused, reference, x: torch.Tensor, seed: int = 0) -> None:
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(x.device, x.dtype)
    got_y, got_g = value_and_grad(fused, x, upstream)
    want_y, want_g = value_and_grad(reference, x, upstream)
    assert got_y.dtype == want_y.dtype and got_g.dtype == want_g.dtype
    assert torch.equal(got_y, want_y), (got_y - want_y).abs().max()
    assert torch.equal(got_g, want_g), (got_g - want_g).abs().max()


def weights(shape, dtype, seed: int, scale: float = 0.05) -> torch.Tensor:
    return (scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).to(dtype)


# --- weights --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_weight_quant_equals_reference(bits, per_channel, dtype, device):
    for seed, shape in enumerate([(64, 64, 3, 3), (128, 32, 1, 1), (10, 20), (7,)]):
        w = weights(shape, dtype, seed + 10 * bits).to(device)
        assert_same(lambda v: weight_quant(v, bits, per_channel), lambda v: ref_weight(v, bits, per_channel), w, seed)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_weight_quant_edge_cases_equal_reference(bits, per_channel):
    w = torch.tensor(
        [
            [0.5, -0.5, 0.2, 0.5, 0.0, -0.0],  # the maximum |tanh| reached three times, with both signs
            [12.0, 30.0, -15.0, 1.0, 1.5, -1.0],  # tanh saturates to exactly +-1; |w| = 1 on the clip edge
            [0.0, 0.0, 0.0, 1e-3, 0.0, 0.0],  # a single non-zero element
            [-2.0, -2.0, 0.3, 0.1, -0.1, 0.25],
        ]
    )
    for dtype in DTYPES:
        assert_same(lambda v: weight_quant(v, bits, per_channel), lambda v: ref_weight(v, bits, per_channel), w.to(dtype))


finite = st.floats(-4.0, 4.0, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32)
small_tensors = arrays(np.float32, array_shapes(min_dims=2, max_dims=4, max_side=5), elements=finite).map(torch.from_numpy)


@settings(max_examples=80, deadline=None)
@given(w=small_tensors, bits=st.sampled_from(BITS), per_channel=st.booleans())
def test_weight_quant_equals_reference_on_any_small_tensor(w, bits, per_channel):
    # Tensors whose tanh is all zero (in a channel) give 0/0 in both; compare only where defined.
    t = torch.tanh(w).abs()
    peak = t.flatten(1).amax(1) if per_channel else t.amax()
    if bits > 1 and not bool((peak > 0).all()):
        return
    assert_same(lambda v: weight_quant(v, bits, per_channel), lambda v: ref_weight(v, bits, per_channel), w)


# --- activations ----------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (*DTYPES, torch.bfloat16))
@pytest.mark.parametrize("bits", BITS)
def test_act_quant_equals_reference(bits, dtype, device):
    x = (1.5 * torch.randn(4, 16, 9, 9, generator=torch.Generator().manual_seed(bits), dtype=torch.float64) + 0.4).to(dtype)
    x[0, 0, 0, :6] = torch.tensor([0.0, -0.0, 1.0, -1e-30, 1.0000001, 0.5])  # the edges of [0, 1]
    assert_same(lambda v: act_quant(v, bits), lambda v: ref_act(v, bits), x.to(device), bits)


@pytest.mark.parametrize("device", DEVICES)
def test_act_quant_channels_last_equals_reference(device):
    x = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(0)).to(device, memory_format=torch.channels_last)
    assert_same(lambda v: act_quant(v, 4), lambda v: ref_act(v, 4), x)


@settings(max_examples=80, deadline=None)
@given(x=small_tensors, bits=st.sampled_from(BITS))
def test_act_quant_equals_reference_on_any_small_tensor(x, bits):
    assert_same(lambda v: act_quant(v, bits), lambda v: ref_act(v, bits), x)


def test_act_quant_without_grad_equals_reference():
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(act_quant(x, 3), ref_act(x, 3))
        assert torch.equal(weight_quant(x, 3), ref_weight(x, 3, False))


# --- AQE ------------------------------------------------------------------------------


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("alpha", [0.5, 0.8, 1.0])
@pytest.mark.parametrize("bits", BITS)
def test_aqe_equals_reference(bits, alpha, per_sample):
    for dtype in DTYPES:
        x = (0.7 * torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)).to(dtype)
        x[0, 0, 0, :4] = torch.tensor([1.0, -1.0, 0.0, 1.5])
        assert_same(lambda v: aqe_quant(v, bits, alpha, per_sample), lambda v: RefAQE.apply(v, bits, alpha, per_sample), x, bits)


# --- in a layer stack -----------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (2, 3), (1, 2), (8, 1)])
def test_quantized_layers_equal_the_reference_network(w_bits, a_bits, per_channel):
    torch.manual_seed(0)
    conv1 = QConv2d(3, 8, 3, padding=1, bits=w_bits, per_channel=per_channel)
    conv2 = QConv2d(8, 4, 3, padding=1, bits=w_bits, per_channel=per_channel)
    fused = nn.Sequential(conv1, nn.BatchNorm2d(8), QAct(a_bits), conv2)
    x = torch.randn(2, 3, 8, 8)
    fused(x).square().sum().backward()

    params = {name: p.detach().clone().requires_grad_(True) for name, p in fused.named_parameters()}
    h = F.conv2d(x, ref_weight(params["0.weight"], w_bits, per_channel), params["0.bias"], padding=1)
    h = F.batch_norm(h, None, None, params["1.weight"], params["1.bias"], training=True)
    h = F.conv2d(ref_act(h, a_bits), ref_weight(params["3.weight"], w_bits, per_channel), params["3.bias"], padding=1)
    h.square().sum().backward()
    for name, p in fused.named_parameters():
        assert torch.equal(p.grad, params[name].grad), name


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_quantizers_equal_reference(device):
    """The quantizers under torch.compile. Activations: the same to the bit. Weights: the compiler reorders the
    gradient's sums, so gradients agree to float32 rounding. On CUDA the quantizer distq used
    before its custom operators gave an all-zero compiled gradient (torch 2.11, H200):
    tests/gpu/compiled_act_quant_repro.py reproduces that pattern without distq."""
    torch._dynamo.reset()
    x = (1.5 * torch.randn(4, 16, 9, 9, generator=torch.Generator().manual_seed(0)) + 0.4).to(device)
    assert_same(torch.compile(lambda v: act_quant(v, 4)), lambda v: ref_act(v, 4), x)
    w = weights((32, 16, 3, 3), torch.float32, 1).to(device)
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(2)).to(device)
    for per_channel in (False, True):
        got_y, got_g = value_and_grad(torch.compile(lambda v, pc=per_channel: weight_quant(v, 4, pc)), w, upstream)
        want_y, want_g = value_and_grad(lambda v, pc=per_channel: ref_weight(v, 4, pc), w, upstream)
        assert torch.equal(got_y, want_y)
        torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-5 * want_g.abs().max().item())
