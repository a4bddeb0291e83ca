"""The activation quantizer's native CPU loops (distq.quant.native_cpu) against its PyTorch
passes (eager.act_forward_torch, eager.masked_grad_torch): the same bits, for every bit-width,
the edges of [0, 1], rounding ties, -0, NaN and infinities, contiguous and channels-last, on
every instruction set this CPU has, and on more than one thread; and the cases the loops do
not take fall back to PyTorch."""

from __future__ import annotations

import pytest
import torch

from distq.native.library import load, on_every_isa
from distq.quant import eager, native_cpu

pytestmark = pytest.mark.skipif(load() is None, reason="native kernels unavailable (no C++ compiler)")
SPECIAL = [0.0, -0.0, 1.0, -1e-30, 1.0000001, 0.5, float("nan"), float("inf"), -float("inf"), 1e-45, -1.0]


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The raw bits: -0 and 0, and every NaN, told apart."""
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def activations(bits: int, shape=(4, 16, 9, 9)) -> torch.Tensor:
    x = 1.5 * torch.randn(shape, generator=torch.Generator().manual_seed(bits)) + 0.4
    x.view(-1)[: len(SPECIAL)] = torch.tensor(SPECIAL)
    levels = (1 << bits) - 1
    x.view(-1)[len(SPECIAL) : len(SPECIAL) + levels + 1] = (torch.arange(levels + 1) + 0.5) / levels  # every tie
    return x


@pytest.mark.parametrize("bits", range(1, 9))
def test_forward_is_the_pytorch_passes_to_the_bit(bits):
    for x in (activations(bits), activations(bits).contiguous(memory_format=torch.channels_last)):
        want_y, want_mask = eager.act_forward_torch(x, bits, True)
        for isa, (y, mask) in on_every_isa(lambda x=x: native_cpu.act_forward(x, bits, True)).items():
            assert y.stride() == x.stride() and mask.stride() == x.stride(), isa
            assert torch.equal(bits_of(y), bits_of(want_y)), f"{isa}: {(bits_of(y) != bits_of(want_y)).sum()} values differ"
            assert torch.equal(mask, want_mask), isa
        y, mask = native_cpu.act_forward(x, bits, False)  # no mask wanted: none made
        assert torch.equal(bits_of(y), bits_of(want_y)) and mask.numel() == 0


def test_backward_is_the_pytorch_product_to_the_bit():
    x = activations(4)
    _, mask = eager.act_forward_torch(x, 4, True)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    grad.view(-1)[:4] = torch.tensor([float("inf"), float("nan"), -0.0, -3.0])  # inf * 0 = nan, -3 * 0 = -0
    want = eager.masked_grad_torch(grad, mask)
    for isa, got in on_every_isa(lambda: native_cpu.masked_grad(grad, mask)).items():
        assert torch.equal(bits_of(got), bits_of(want)), isa


def test_many_threads_split_the_work_and_give_the_same_bits():
    x = activations(3, shape=(8, 32, 32, 32))  # 262,144 elements: above the loops' threshold for threads
    want_y, want_mask = eager.act_forward_torch(x, 3, True)
    grad = torch.randn(x.shape)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y, mask = native_cpu.act_forward(x, 3, True)
        got_grad = native_cpu.masked_grad(grad, mask)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(bits_of(y), bits_of(want_y)) and torch.equal(mask, want_mask)
    assert torch.equal(bits_of(got_grad), bits_of(eager.masked_grad_torch(grad, want_mask)))


def test_what_the_loops_do_not_take_falls_back_to_pytorch():
    x = activations(4)
    assert native_cpu.act_forward(x.to(torch.bfloat16), 4, True) is None  # fp32 only
    assert native_cpu.act_forward(x.transpose(2, 3), 4, True) is None  # not dense in a layout the loop reads
    assert native_cpu.act_forward(x[:, :, :, ::2], 4, True) is None
    _, mask = eager.act_forward_torch(x, 4, True)
    grad = torch.randn(x.shape).contiguous(memory_format=torch.channels_last)
    assert native_cpu.masked_grad(grad, mask) is None  # another layout than the mask's
    # ... and the eager entry points still give the PyTorch results there.
    assert torch.equal(bits_of(eager.masked_grad(grad, mask)), bits_of(eager.masked_grad_torch(grad, mask)))
    y, m = eager.act_forward(x.transpose(2, 3), 4, True)
    want_y, want_m = eager.act_forward_torch(x.transpose(2, 3), 4, True)
    assert torch.equal(bits_of(y), bits_of(want_y)) and torch.equal(m, want_m)


def test_training_takes_the_native_loops(monkeypatch):
    """A W4A4 layer's forward and backward on the CPU go through the library (counted), and
    give what the PyTorch passes give."""
    from distq.quant.functional import act_quant

    calls = []
    real_load = native_cpu.load
    monkeypatch.setattr(native_cpu, "load", lambda: calls.append(1) or real_load())
    x = activations(4).requires_grad_()
    y = act_quant(x, 4, "auto")
    y.backward(torch.ones_like(y))
    assert len(calls) == 2  # forward and backward
    want_y, want_mask = eager.act_forward_torch(x.detach(), 4, True)
    assert torch.equal(bits_of(y.detach()), bits_of(want_y))
    assert torch.equal(x.grad, want_mask.float())


def test_without_a_compiler_training_says_so_once_and_runs_the_pytorch_passes(tmp_path):
    import os
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from distq.quant import eager\n"
        "from distq.quant.functional import act_quant\n"
        "for _ in range(3):\n"
        "    x = (torch.randn(2, 3, 8, 8) + 0.3).requires_grad_()\n"
        "    act_quant(x, 4).sum().backward()\n"
        "    assert torch.equal(x.grad, eager.act_forward_torch(x.detach(), 4, True)[1].float())\n"
        "print('trained')\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), DISTQ_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["trained"]
    notes = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(notes) == 1 and "native kernels unavailable (no C++ compiler found" in notes[0], notes


# --- DoReFa weights ---------------------------------------------------------------------------

EDGE_WEIGHTS = torch.tensor(
    [
        [0.5, -0.5, 0.2, 0.5, 0.0, -0.0],  # the maximum |tanh| three times, both signs
        [12.0, 30.0, -15.0, 1.0, 1.5, -1.0],  # tanh saturates to exactly +-1
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # an all-zero channel
        [-2.0, -2.0, 0.3, 0.1, -0.1, 0.25],
    ]
)


def weight_cases():
    g = torch.Generator().manual_seed(3)
    for shape in [(64, 32, 3, 3), (33, 7, 1, 1), (10, 20), (7,), (256, 128, 3, 3)]:  # the last: > 2^16, threads split one row
        yield 0.05 * torch.randn(shape, generator=g)
    yield EDGE_WEIGHTS
    yield torch.zeros(8, 3, 3, 3)
    yield (0.05 * torch.randn(16, 8, 3, 3, generator=g)).contiguous(memory_format=torch.channels_last)


def dorefa_both(w: torch.Tensor, bits: int, per_channel: bool):
    """(forward, backward) through eager's DoReFa functions with the native loops, and with
    PyTorch's passes only (the library hidden), on the same upstream gradient."""
    grad = torch.empty_like(w).copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(bits)))  # w's layout

    def run():
        q, t, s = eager.dorefa_forward(w, bits, per_channel)
        return q, eager.dorefa_backward(grad, t, s, per_channel)

    native = on_every_isa(run)
    with native_cpu.pytorch_passes_only():
        reference = run()
    return native, reference


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dorefa_weights_are_the_pytorch_passes_to_the_bit(bits, monkeypatch):
    calls = []
    real_load = native_cpu.load
    monkeypatch.setattr(native_cpu, "load", lambda: calls.append(1) or real_load())
    for w in weight_cases():
        for per_channel in (False, True):
            native, (want_q, want_g) = dorefa_both(w, bits, per_channel)
            for isa, (q, g) in native.items():
                case = f"{isa} {tuple(w.shape)} per_channel={per_channel}"
                assert torch.equal(bits_of(q), bits_of(want_q)), case
                assert torch.equal(bits_of(g), bits_of(want_g)), f"{case}: {(bits_of(g) != bits_of(want_g)).sum()} gradients differ"
    assert calls  # the loops ran (the comparison is not PyTorch against itself)


def test_dorefa_loops_decline_what_they_do_not_take():
    w = (0.05 * torch.randn(16, 8, 3, 3)).contiguous(memory_format=torch.channels_last)
    t = torch.tanh(w)
    s = t.abs().amax(dim=(1, 2, 3), keepdim=True)
    assert native_cpu.dorefa_forward(t, s, 4, True) is None  # per channel: rows must be contiguous
    assert native_cpu.dorefa_forward(t.double(), s.double(), 4, False) is None  # fp32 only
    assert native_cpu.dorefa_backward_terms(t, t.abs().amax(), torch.randn(w.shape), False) is None  # grad in another layout
