"""The quantizer maths of docs/methods.md ("Quantizers"), checked against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from distq.quant.functional import (
    FULL_PRECISION,
    VALID_BITS,
    act_quant,
    aqe_hard,
    aqe_quant,
    check_bits,
    pow2_magnitudes,
    quantize_unit,
    weight_quant,
)

MULTI_BITS = range(2, 9)
LOW_BITS = range(1, 9)

finite = st.floats(-4.0, 4.0, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=64)
tensors = arrays(np.float64, array_shapes(min_dims=1, max_dims=4, max_side=6), elements=finite).map(torch.from_numpy)
# Weights of a conv/linear layer: (out_channels, ...) with at least two dims.
weight_tensors = arrays(np.float64, array_shapes(min_dims=2, max_dims=4, max_side=5), elements=finite).map(torch.from_numpy)
fast = settings(max_examples=60, deadline=None)


def grad_of(fn, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    fn(x).backward(upstream)
    return x.grad


def upstream_like(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g, dtype=x.dtype)


def weight_ref_unrounded(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """The k >= 2 weight quantizer with the rounding replaced by the identity."""
    t = torch.tanh(w)
    if per_channel:
        scale = t.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
    else:
        scale = t.abs().amax()
    return 2 * (t / (2 * scale) + 0.5) - 1


def on_weight_grid(values: torch.Tensor, bits: int) -> bool:
    """Every value is 2 i / (2^k - 1) - 1 for an integer i in 0 .. 2^k - 1."""
    i = (values + 1) / 2 * ((1 << bits) - 1)
    return bool(((i - i.round()).abs() < 1e-6).all() and (i.round() >= 0).all() and (i.round() <= (1 << bits) - 1).all())


def nonzero_tanh(w: torch.Tensor) -> bool:
    return bool(torch.tanh(w).abs().max() > 0)


# --- bit-widths -----------------------------------------------------------------------


@pytest.mark.parametrize("bits", VALID_BITS)
def test_check_bits_accepts_valid_widths(bits):
    assert check_bits(bits) == bits


@pytest.mark.parametrize("bits", [0, 9, 16, 33, -1, True, 4.0, "4", None])
def test_check_bits_rejects_everything_else(bits):
    with pytest.raises(ValueError, match="valid bit-width"):
        check_bits(bits)


def test_quantize_unit_is_the_k_bit_grid():
    z = torch.linspace(0, 1, 10001, dtype=torch.float64)
    for bits in LOW_BITS:
        levels = (1 << bits) - 1
        q = quantize_unit(z, bits)
        assert torch.equal(q, torch.round(z * levels) / levels)
        assert q.unique().numel() == levels + 1


# --- weights, k >= 2 ------------------------------------------------------------------


@fast
@given(w=weight_tensors, bits=st.sampled_from(MULTI_BITS), per_channel=st.booleans())
def test_weight_quant_values_are_on_the_grid(w, bits, per_channel):
    assume(nonzero_tanh(w) if not per_channel else bool((torch.tanh(w).abs().flatten(1).amax(1) > 0).all()))
    q = weight_quant(w, bits, per_channel)
    assert q.shape == w.shape
    assert q.min() >= -1 and q.max() <= 1
    assert q.unique().numel() <= 1 << bits
    assert on_weight_grid(q, bits)
    # The element of largest |w| lands on an end of the range: +-1 exactly.
    assert bool((q.abs() == 1).any())


@pytest.mark.parametrize("bits", MULTI_BITS)
def test_weight_quant_uses_all_levels_on_a_large_tensor(bits):
    w = torch.randn(1 << 18, generator=torch.Generator().manual_seed(bits))
    q = weight_quant(w, bits)
    levels = q.unique()
    assert levels.numel() == 1 << bits
    expected = torch.arange(1 << bits, dtype=torch.float64) * 2 / ((1 << bits) - 1) - 1
    assert torch.allclose(levels.double(), expected, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4])
def test_weight_quant_matches_the_formula(bits):
    w = torch.randn(64, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tanh(w)
    z = t / (2 * t.abs().max()) + 0.5
    levels = (1 << bits) - 1
    assert torch.equal(weight_quant(w, bits), 2 * (torch.round(z * levels) / levels) - 1)


@fast
@given(w=weight_tensors, bits=st.sampled_from(MULTI_BITS), per_channel=st.booleans())
def test_weight_quant_gradient_is_ste_only_at_the_rounding(w, bits, per_channel):
    assume(nonzero_tanh(w) if not per_channel else bool((torch.tanh(w).abs().flatten(1).amax(1) > 0).all()))
    g = upstream_like(w)
    got = grad_of(lambda x: weight_quant(x, bits, per_channel), w, g)
    want = grad_of(lambda x: weight_ref_unrounded(x, per_channel), w, g)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)


def test_weight_quant_gradient_is_not_the_plain_identity():
    # Guards the reference above: tanh and the normalisation really shape the gradient.
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g = torch.ones_like(w)
    got = grad_of(lambda x: weight_quant(x, 4), w, g)
    assert not torch.allclose(got, g)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_per_channel_weight_quant_quantizes_each_channel_alone(bits):
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w[2] *= 10  # channels of very different ranges: a per-layer scale would crush the others
    w[4] *= 0.01
    g = upstream_like(w)
    q = weight_quant(w, bits, per_channel=True)
    grad = grad_of(lambda x: weight_quant(x, bits, per_channel=True), w, g)
    for c in range(w.shape[0]):
        assert torch.equal(q[c], weight_quant(w[c : c + 1], bits)[0])
        assert torch.allclose(grad[c], grad_of(lambda x: weight_quant(x, bits), w[c : c + 1], g[c : c + 1])[0])
    assert not torch.equal(q, weight_quant(w, bits))


@pytest.mark.parametrize("bits", [2, 4])
def test_zero_weights_quantize_to_finite_values_with_finite_gradients(bits):
    """A pruned (all-zero) layer or channel has max|tanh w| = 0: no 0 / 0 = NaN."""
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    w[1] = 0
    g = upstream_like(w)
    for per_channel, x in ((False, torch.zeros_like(w)), (True, w)):
        q = weight_quant(x, bits, per_channel=per_channel)
        grad = grad_of(lambda v, pc=per_channel: weight_quant(v, bits, per_channel=pc), x, g)
        assert torch.isfinite(q).all() and torch.isfinite(grad).all()
        zero = q[1] if per_channel else q
        nearest = 1 / ((1 << bits) - 1)  # the levels nearest 0 are +-1/(2^k - 1)
        assert torch.allclose(zero.abs(), torch.full_like(zero, nearest))
    # The other channels are quantized exactly as before.
    for c in (0, 2, 3):
        assert torch.equal(q[c], weight_quant(w[c : c + 1], bits)[0])


def test_per_channel_is_ignored_for_one_dimensional_tensors():
    w = torch.randn(32, generator=torch.Generator().manual_seed(4))
    for bits in (1, 3):
        assert torch.equal(weight_quant(w, bits, per_channel=True), weight_quant(w, bits))


# --- weights, k = 1 -------------------------------------------------------------------


@fast
@given(w=weight_tensors, per_channel=st.booleans())
def test_binary_weights_are_plus_minus_mean_abs(w, per_channel):
    q = weight_quant(w, 1, per_channel)
    dims = tuple(range(1, w.dim()))
    scale = w.abs().mean(dim=dims, keepdim=True) if per_channel else w.abs().mean()
    want = torch.where(w >= 0, scale, -scale).expand_as(w)
    assert torch.equal(q, want)
    if not per_channel:
        assert set(q.unique().tolist()) <= {scale.item(), -scale.item()}


@fast
@given(w=weight_tensors, per_channel=st.booleans())
def test_binary_weight_gradient_is_clipped_ste(w, per_channel):
    g = upstream_like(w)
    got = grad_of(lambda x: weight_quant(x, 1, per_channel), w, g)
    assert torch.equal(got, g * (w.abs() <= 1).to(g.dtype))


def test_binary_gradient_mask_includes_the_boundary():
    w = torch.tensor([-1.5, -1.0, -0.3, 0.0, 0.3, 1.0, 1.5], dtype=torch.float64)
    got = grad_of(lambda x: weight_quant(x, 1), w, torch.ones_like(w))
    assert got.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert weight_quant(w, 1).tolist() == pytest.approx([-5.6 / 7, -5.6 / 7, -5.6 / 7, 5.6 / 7, 5.6 / 7, 5.6 / 7, 5.6 / 7])


# --- activations ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", LOW_BITS)
def test_act_quant_has_2k_levels_in_unit_interval(bits):
    x = torch.linspace(-0.5, 1.5, 100_001, dtype=torch.float64)
    q = act_quant(x, bits)
    levels = q.unique()
    assert levels.numel() == 1 << bits
    assert torch.allclose(levels, torch.arange(1 << bits, dtype=torch.float64) / ((1 << bits) - 1))
    assert q.min() == 0 and q.max() == 1


@fast
@given(x=tensors, bits=st.sampled_from(LOW_BITS))
def test_act_quant_forward_and_gradient(x, bits):
    q = act_quant(x, bits)
    levels = (1 << bits) - 1
    assert torch.equal(q, torch.round(x.clamp(0, 1) * levels) / levels)
    g = upstream_like(x)
    got = grad_of(lambda v: act_quant(v, bits), x, g)
    assert torch.equal(got, g * ((x >= 0) & (x <= 1)).to(g.dtype))


def test_act_quant_gradient_at_known_points():
    x = torch.tensor([-0.5, 0.0, 0.4, 1.0, 1.5])
    assert grad_of(lambda v: act_quant(v, 2), x, torch.ones_like(x)).tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert act_quant(x, 2).tolist() == pytest.approx([0.0, 0.0, 1 / 3, 1.0, 1.0])


# --- full precision -------------------------------------------------------------------


def test_full_precision_returns_the_input_object():
    x = torch.randn(4, 5, requires_grad=True)
    assert weight_quant(x, FULL_PRECISION) is x
    assert weight_quant(x, FULL_PRECISION, per_channel=True) is x
    assert act_quant(x, FULL_PRECISION) is x
    assert aqe_quant(x, FULL_PRECISION, 0.7) is x


# --- AQE ------------------------------------------------------------------------------


def aqe_hard_ref(x: np.ndarray, bits: int, mean_abs: float) -> np.ndarray:
    """Independent h: sign; ternary with Delta = mean_abs / 2; nearest power-of-two level
    (ties go up) of |x| clipped to 1."""
    if bits == 1:
        return np.where(x >= 0, 1.0, -1.0)
    if bits == 2:
        return np.sign(x) * (np.abs(x) > 0.5 * mean_abs)
    cands = np.array([0.0] + [2.0**-p for p in range(2 ** (bits - 1) - 1)])[::-1]  # largest first
    mag = np.minimum(np.abs(x), 1.0)[..., None]
    dist = np.abs(mag - cands)
    out = cands[np.argmin(dist, axis=-1)]  # argmin takes the first, i.e. the larger level on a tie
    return np.sign(x) * out


@pytest.mark.parametrize("bits", range(3, 9))
def test_pow2_levels(bits):
    mags = pow2_magnitudes(bits)
    assert len(mags) == (1 << (bits - 1)) - 1  # with 0 and the signs: 2^bits - 1 levels
    assert mags == [2.0**-p for p in range(len(mags))]
    x = torch.linspace(-2, 2, 40_001, dtype=torch.float64)
    h = aqe_hard(x, bits)
    allowed = {0.0} | set(mags) | {-m for m in mags}
    assert set(h.unique().tolist()) <= allowed
    # Every level down to 2^-(2^(n-1)-2) is reachable; the dense grid reaches those above its spacing.
    reachable = {m for m in mags if m > 4 * 1e-4}
    assert reachable <= set(h.abs().unique().tolist())


@fast
@given(x=tensors, bits=st.sampled_from(LOW_BITS))
def test_aqe_hard_matches_reference(x, bits):
    mean_abs = x.abs().mean().item()  # torch's own sum order, so a tie at Delta cannot flip
    assert np.array_equal(aqe_hard(x, bits).numpy(), aqe_hard_ref(x.numpy(), bits, mean_abs))


def test_aqe_hard_midpoints():
    # 3 bits: levels 0, 1/4, 1/2, 1 -> midpoints 1/8, 3/8, 3/4 (a midpoint goes up).
    x = torch.tensor([0.1, 0.125, 0.2, 0.375, 0.7, 0.75, 1.0, 3.0, -0.3, -0.8])
    assert aqe_hard(x, 3).tolist() == [0.0, 0.25, 0.25, 0.5, 0.5, 1.0, 1.0, 1.0, -0.25, -1.0]


def test_aqe_ternary_threshold_is_half_the_mean_magnitude():
    x = torch.tensor([0.1, -0.1, 0.41, -0.39, 1.0, -2.0])  # mean|x| = 0.666.., Delta = 0.333..
    assert aqe_hard(x, 2).tolist() == [0.0, 0.0, 1.0, -1.0, 1.0, -1.0]
    assert aqe_hard(10 * x, 2).tolist() == [0.0, 0.0, 1.0, -1.0, 1.0, -1.0]  # scale-free


def test_aqe_ternary_threshold_per_sample():
    x = torch.tensor([[0.1, 0.2, 0.3, 0.4], [10.0, 20.0, 30.0, 40.0]])
    per_sample = aqe_quant(x, 2, 1.0, per_sample=True)
    assert per_sample.tolist() == [[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]]
    whole = aqe_quant(x, 2, 1.0)  # Delta = 0.5 * 12.625: the small sample vanishes
    assert whole.tolist() == [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]


def test_aqe_sign_for_one_bit():
    x = torch.tensor([-3.0, -0.1, 0.0, 0.2, 5.0])
    assert aqe_quant(x, 1, 1.0).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]


@fast
@given(x=tensors, bits=st.sampled_from(LOW_BITS), alpha=st.floats(0.0, 1.0), per_sample=st.booleans())
def test_aqe_forward_and_backward(x, bits, alpha, per_sample):
    dims = tuple(range(1, x.dim())) if per_sample and x.dim() > 1 else None
    h = aqe_hard(x, bits, dims)
    got = aqe_quant(x, bits, alpha, per_sample=per_sample)
    assert torch.allclose(got, alpha * h + (1 - alpha) * x, rtol=0, atol=1e-12)
    g = upstream_like(x)
    grad = grad_of(lambda v: aqe_quant(v, bits, alpha, per_sample=per_sample), x, g)
    assert torch.allclose(grad, 2 * alpha * g * (x.abs() <= 1).to(g.dtype), rtol=0, atol=1e-12)


@pytest.mark.parametrize("bits", LOW_BITS)
def test_aqe_alpha_one_is_the_hard_quantizer(bits):
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(bits))
    assert torch.equal(aqe_quant(x, bits, 1.0), aqe_hard(x, bits))


@pytest.mark.parametrize("bits", LOW_BITS)
def test_aqe_at_half_alpha_has_the_clipped_ste_gradient(bits):
    x = 1.5 * torch.randn(200, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    g = upstream_like(x)
    got = grad_of(lambda v: aqe_quant(v, bits, 0.5), x, g)
    clipped_ste = grad_of(lambda v: weight_quant(v, 1), x, g)  # the binary quantizer's STE
    assert torch.equal(got, clipped_ste)
    assert torch.equal(got, g * (x.abs() <= 1).to(g.dtype))
    assert bool((got == 0).any()) and bool((got != 0).any())
