"""The Triton kernels of the quantizers (quant.kernels=triton) against the PyTorch kernels
(quant.kernels=torch, pinned to the formulas by test_quant_reference.py): the same outputs
to the bit, every bit-width, per layer and per channel, fp32 and bf16, ties at the maximum,
all-zero channels, the edges of [0, 1]; the same gradients, except the DoReFa weight
quantizer's, whose scale term sums in another order (within a few units in the last place).
Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it), on CUDA
natively (pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from distq.quant import ops
from distq.quant.functional import act_quant, aqe_quant, weight_quant
from distq.quant.layers import QAct, QConv2d, QLinear, quant_layers

BITS = range(1, 9)
DTYPES = (torch.float32, torch.bfloat16)
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ("cpu", pytest.param("cuda", marks=[pytest.mark.gpu, NO_CUDA]))
# The DoReFa gradient at the peaks (|tanh w| = max) adds the scale's share, a sum over the whole
# tensor or channel in another order: a few units in the last place, of the largest gradient.
# fp32: sqrt(n) eps bounds a sum of n terms' rounding in practice, 1e-5 leaves room for n up to
# 25,000. bf16: the kernel rounds every term to bf16 as PyTorch does and adds in fp32 (another
# order): the sum rounded to bf16 may differ by a unit in its last place (2^-8 of it).
PEAK_GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7}


def value_and_grad(fn, x: torch.Tensor, seed: int = 0):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, y.dtype)
    y.backward(upstream)
    return y.detach(), x.grad


def compare(fn, x: torch.Tensor, inexact: torch.Tensor | None = None, rtol: float = 0.0) -> None:
    """fn(x, "triton") against fn(x, "torch"): outputs bit for bit; gradients bit for bit, except
    where ``inexact`` is true: there within ``rtol`` of the largest gradient (the scale term
    itself can nearly cancel an element's own term, so not of the element's value)."""
    got_y, got_g = value_and_grad(lambda v: fn(v, "triton"), x)
    want_y, want_g = value_and_grad(lambda v: fn(v, "torch"), x)
    assert got_y.dtype == want_y.dtype and got_g.dtype == want_g.dtype
    assert torch.equal(got_y, want_y), (got_y.float() - want_y.float()).abs().max()
    exact = torch.ones_like(x, dtype=torch.bool) if inexact is None else ~inexact
    assert torch.equal(got_g[exact], want_g[exact]), (got_g.float() - want_g.float())[exact].abs().max()
    if inexact is not None:
        gap = (got_g.float() - want_g.float())[inexact].abs()
        assert bool((gap <= rtol * want_g.float().abs().max()).all()), gap.max()


def peaks(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Where |tanh w| reaches its maximum (of the tensor or of the channel)."""
    t = torch.tanh(w).abs().float()
    top = t.flatten(1).amax(1).view(-1, *[1] * (w.dim() - 1)) if per_channel and w.dim() > 1 else t.amax()
    return t == top


def weights(shape, dtype, seed: int) -> torch.Tensor:
    return (0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


EDGE_WEIGHTS = torch.tensor(
    [
        [0.5, -0.5, 0.2, 0.5, 0.0, -0.0],  # the maximum |tanh| reached three times, with both signs
        [12.0, 30.0, -15.0, 1.0, 1.5, -1.0],  # tanh saturates to exactly +-1; |w| = 1 on the clip edge
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # an all-zero channel
        [-2.0, -2.0, 0.3, 0.1, -0.1, 0.25],
    ]
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_weight_kernels(bits, dtype, device):
    rtol = PEAK_GRAD_RTOL[dtype]
    for per_channel in (False, True):
        cases = [weights(shape, dtype, seed + 10 * bits) for seed, shape in enumerate([(64, 32, 3, 3), (33, 7, 1, 1), (10, 20), (7,)])]
        for w in [*cases, EDGE_WEIGHTS.to(dtype), torch.zeros(8, 3, 3, 3, dtype=dtype)]:
            inexact = None if bits == 1 else peaks(w, per_channel).to(device)
            compare(lambda v, k, pc=per_channel: weight_quant(v, bits, pc, k), w.to(device), inexact, rtol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_kernels_split_long_rows_over_programs(dtype, monkeypatch):
    """A row longer than SPLIT elements (a per-tensor scale over a large weight) is reduced by
    several programs, whose partial maxima and sums the elementwise kernels combine: the same
    outputs as the PyTorch kernels, gradients within the peak tolerance, and the same bits on
    every call (the partials are added in a fixed order)."""
    from distq.quant import triton_kernels

    monkeypatch.setattr(triton_kernels, "SPLIT", 1000)  # 3 to 19 pieces a row below; not a multiple of ROW_BLOCK
    big, wide, zeros = weights((64, 32, 3, 3), dtype, 7), weights((3, 4000), dtype, 8), torch.zeros(3, 2500, dtype=dtype)
    for w, per_channel in ((big, False), (wide, False), (wide, True), (zeros, False), (zeros, True)):
        assert triton_kernels._splits(w.numel() // (w.shape[0] if per_channel else 1)) > 1
        compare(lambda v, k, pc=per_channel: weight_quant(v, 4, pc, k), w, peaks(w, per_channel), PEAK_GRAD_RTOL[dtype])
        first, again = (value_and_grad(lambda v, pc=per_channel: weight_quant(v, 4, pc, "triton"), w) for _ in range(2))
        assert torch.equal(first[1], again[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_activation_kernels(bits, dtype, device):
    x = (1.5 * torch.randn(4, 16, 9, 9, generator=torch.Generator().manual_seed(bits)) + 0.4).to(dtype)
    x[0, 0, 0, :6] = torch.tensor([0.0, -0.0, 1.0, -1e-30, 1.0000001, 0.5])  # the edges of [0, 1]
    levels = (1 << bits) - 1
    x[1].view(-1)[: levels + 1] = (torch.arange(levels + 1) + 0.5) / levels  # every tie of the rounding
    compare(lambda v, k: act_quant(v, bits, k), x.to(device))
    compare(lambda v, k: act_quant(v, bits, k), x.to(device).contiguous(memory_format=torch.channels_last))
    with torch.no_grad():  # no mask is kept when nothing needs a gradient
        assert torch.equal(act_quant(x.to(device), bits, "triton"), act_quant(x.to(device), bits, "torch"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_aqe_kernels(bits, dtype, device):
    x = (0.7 * torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(bits))).to(dtype)
    x[0, 0, 0, :4] = torch.tensor([1.0, -1.0, 0.0, 1.5])
    for alpha in (0.5, 0.8, 1.0):
        for per_sample in (False, True):
            compare(lambda v, k, a=alpha, ps=per_sample: aqe_quant(v, bits, a, ps, k), x.to(device))


@pytest.mark.parametrize("device", DEVICES)
def test_nan_stays_nan_as_in_pytorch(device):
    """A NaN input gives NaN where PyTorch gives NaN (clamp and amax keep NaN; CUDA's plain
    max.f32 would turn a NaN activation into 0 and hide a diverged run: the kernels ask for
    NaN-propagating max/min, tests/quant/test_triton_cuda_build.py checks the compiled code)."""
    nan = float("nan")
    x = torch.tensor([[nan, -1.0, 0.3, 2.0], [0.5, 0.7, -0.2, 1.0]], device=device)
    cases = {"act": lambda v, k: act_quant(v, 4, k), "aqe": lambda v, k: aqe_quant(v, 3, 0.5, True, k)}
    for bits in (2, 4):
        for per_channel in (False, True):
            cases[f"w{bits}{'c' if per_channel else ''}"] = lambda v, k, b=bits, pc=per_channel: weight_quant(v, b, pc, k)
    for name, fn in cases.items():
        with torch.no_grad():
            got, want = fn(x, "triton"), fn(x, "torch")
        assert bool(want.isnan().any()), name  # the case has a NaN to keep
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=name)


def test_triton_on_the_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        act_quant(torch.randn(4, requires_grad=True), 4, "triton")
    assert not ops.kernels_for(torch.randn(4), "auto")  # auto on the CPU: the PyTorch kernels
    assert not ops.kernels_for(torch.randn(4, dtype=torch.float64), "triton")  # fp64: PyTorch's


OPS = {
    "act_quant": (ops.act_quant_op, lambda x: (x, 4, True, True)),
    "dorefa_weight": (ops.dorefa_weight_op, lambda x: (x, 3, True, True)),
    "binary_weight": (ops.binary_weight_op, lambda x: (x, False, True)),
    "aqe": (ops.aqe_op, lambda x: (x, 2, 0.7, True, True, True)),
}


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("name", list(OPS))
def test_custom_operators_pass_opcheck(name, use_triton):
    op, args = OPS[name]
    x = (0.5 * torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(0))).requires_grad_()
    arguments = list(args(x))
    arguments[-1] = use_triton
    torch.library.opcheck(op, tuple(arguments))


def tiny_w4a4(kernels: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), QAct(4), QConv2d(8, 16, 3, padding=1, bits=4), nn.BatchNorm2d(16), QAct(4),
        QConv2d(16, 16, 3, padding=1, bits=2, per_channel=True), nn.BatchNorm2d(16), QAct(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        QLinear(16, 10, bits=1), nn.Linear(10, 10),
    )  # fmt: skip
    for _, layer in quant_layers(model):
        layer.kernels = kernels
    return model


def test_a_tiny_w4a4_model_gives_the_same_outputs_with_both_kernels():
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    runs = {}
    for kernels in ("torch", "triton"):
        model = tiny_w4a4(kernels)
        out = model(x)
        out.square().sum().backward()
        runs[kernels] = (out.detach(), {n: p.grad for n, p in model.named_parameters()})
    assert torch.equal(runs["triton"][0], runs["torch"][0])
    for name, grad in runs["torch"][1].items():
        scale = grad.abs().max().clamp_min(1e-30)
        assert (runs["triton"][1][name] - grad).abs().max() / scale <= 1e-5, name
