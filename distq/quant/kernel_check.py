"""The Triton kernels check themselves against the PyTorch kernels at their first use.

The first time a custom operator of ``distq.quant.ops`` is about to run a Triton kernel on a
device and dtype, ``triton_agrees`` runs that kernel and its PyTorch counterpart
(``distq.quant.eager``, with PyTorch's passes only: not the native CPU loops, which check
themselves in ``distq.quant.native_cpu``) on a small deterministic probe of that dtype on that
device: a few thousand elements with rounding ties, values outside [0, 1] and [-1, 1], the
maximum |tanh w| reached several times, an all-zero channel; every bit-width the kernel takes
at run time, per tensor and per channel (per sample for AQE), with and without the mask. The
forward outputs must match to the bit, the DoReFa weight gradient too except where |tanh w| is
largest (its scale term sums in another order: within a few units in the last place of the
largest gradient, the tolerance of tests/quant/test_triton_kernels.py). The verdict is cached
per process, kernel, device and dtype: the check costs a few dozen small launches, once.

A kernel that fails to compile, raises, or disagrees falls back to its PyTorch kernel for the
rest of the process, under ``quant.kernels=auto``, with one line on stderr naming the kernel,
the device and the reason; under ``quant.kernels=triton`` (``strict``) it raises ``DistqError``
instead (the CLI prints it as one ``distq: error:`` line and exits non-zero).

The check calls the kernels of ``distq.quant.triton_kernels`` directly, never the operators,
so it cannot trigger itself. It runs inside the operators' real implementations, which
``torch.compile`` never runs while tracing (it traces their fake kernels): under the compiler
the check runs, eagerly, at the first real call of the compiled graph. During CUDA graph
capture (where its synchronizing comparisons are not allowed) an unchecked kernel is not
checked: ``auto`` takes the PyTorch kernel for that call (CUDA-graph trees warm a graph up
eagerly before capturing it, so the check has normally run by then).

Only the AQE kernel's bit-width is a compile-time constant: its check covers the bit-width of
the first call (alpha 1 and below, with and without the mask, per tensor and per sample).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from distq.errors import DistqError
from distq.quant import eager, native_cpu

# The gradient of DoReFa weights at the peaks (|tanh w| = max) adds the scale's share, a sum in
# another order than PyTorch's: within this fraction of the largest gradient (as the tests).
PEAK_GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7}

_verdicts: dict[tuple[str, str, torch.dtype], str | None] = {}
"""(kernel, device, dtype) -> None where the Triton kernel agrees, else why not."""
_warned: set[tuple[str, str, torch.dtype]] = set()
checks_run: list[str] = []
"""The kernels checked in this process, in order (tests count them)."""


def reset() -> None:
    """Forget every verdict (tests)."""
    _verdicts.clear()
    _warned.clear()
    checks_run.clear()


def _triton():
    from distq.quant import triton_kernels

    return triton_kernels


def triton_agrees(kernel: str, like: Tensor, strict: bool, bits: int | None = None) -> bool:
    """Whether the operator runs Triton kernel ``kernel`` for tensors like ``like`` (its device
    and dtype), checking the kernel on the first call. ``strict`` (``quant.kernels=triton``):
    raise ``DistqError`` instead of falling back. ``bits``: the AQE kernel's bit-width."""
    key = (kernel, str(like.device), like.dtype)
    if key not in _verdicts:
        if like.is_cuda and torch.cuda.is_current_stream_capturing():
            return strict  # no check inside a capture: see the module's docstring
        _verdicts[key] = _run_check(kernel, like.device, like.dtype, bits)
    if _verdicts[key] is None:
        return True
    if strict:
        raise DistqError(f"{_describe(key)}; quant.kernels=triton does not fall back: use quant.kernels=auto "
                         "(which falls back to the PyTorch kernel) or quant.kernels=torch")  # fmt: skip
    if key not in _warned:
        _warned.add(key)
        print(f"distq: warning: {_describe(key)}: using the PyTorch kernel for this run", file=sys.stderr, flush=True)
    return False


def _describe(key) -> str:
    kernel, device, dtype = key
    return f"Triton kernel {kernel} on {device} ({str(dtype).removeprefix('torch.')}) {_verdicts[key]}"


def _run_check(kernel: str, device: torch.device, dtype: torch.dtype, bits: int | None) -> str | None:
    checks_run.append(kernel)
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False), native_cpu.pytorch_passes_only():
            return CHECKS[kernel](device, dtype, bits)
    except Exception as exc:  # a kernel that does not compile or raises: fall back, say why
        message = " ".join(str(exc).split())
        message = message if len(message) <= 200 else message[:197] + "..."
        return f"failed ({type(exc).__name__}: {message})" if message else f"failed ({type(exc).__name__})"


# --- comparisons -------------------------------------------------------------------------------


def _index(flat: int, shape) -> list[int]:
    return [int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(shape))] if len(shape) else []


def _differ(got: Tensor, want: Tensor, what: str, exact: Tensor | None = None, rtol: float = 0.0) -> str | None:
    """None where ``got`` is ``want`` (the same values, NaN where NaN; within ``rtol`` of the
    largest |want| where ``exact`` is false), else the reason, with the largest difference."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"disagrees with the PyTorch kernel ({what}: {got.dtype} {tuple(got.shape)} instead of {want.dtype} {tuple(want.shape)})"
    g, w = got.double(), want.double()
    same = (g == w) | (g.isnan() & w.isnan())
    if exact is not None:
        same |= ~exact & ((g - w).abs() <= rtol * w.abs().max())
    if bool(same.all()):
        return None
    gap = torch.where(same, 0.0, (g - w).abs().nan_to_num(float("inf")))
    at = int(gap.flatten().argmax())
    return (f"disagrees with the PyTorch kernel (max |diff| {gap.flatten()[at].item():.4g} at {_index(at, got.shape)} of "
            f"{what}: {g.flatten()[at].item():.6g} instead of {w.flatten()[at].item():.6g})")  # fmt: skip


def _first(*reasons: str | None) -> str | None:
    return next((r for r in reasons if r is not None), None)


# --- probes: deterministic, a few thousand elements -------------------------------------------


def _randn(shape, seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _activations(device, dtype) -> Tensor:
    """1.5 N(0.4, 1): about a third outside [0, 1]; the edges of [0, 1] and every rounding tie of
    every bit-width (the ties of k bits at (i + 1/2) / (2^k - 1))."""
    x = 1.5 * _randn((16, 256), 11) + 0.4
    flat = x.view(-1)
    edges = [0.0, -0.0, 1.0, -1e-30, 1.0000001, 0.5, -1.0, 2.0, 1e-30]
    flat[: len(edges)] = torch.tensor(edges)
    at = len(edges)
    for bits in range(1, 9):
        levels = (1 << bits) - 1
        flat[at : at + levels + 1] = (torch.arange(levels + 1) + 0.5) / levels
        at += levels + 1
    return x.to(device, dtype)


def _weights(device, dtype) -> Tensor:
    """4 x 576 weights (0.05 N(0, 1)) with the edge cases: the maximum |tanh w| three times with
    both signs, tanh saturating to +-1, |w| = 1, an all-zero row (few rows: the interpreter
    runs a program per row slowly)."""
    w = 0.05 * _randn((4, 576), 12)
    w[0, :6] = torch.tensor([0.5, -0.5, 0.2, 0.5, 0.0, -0.0])
    w[0, 6:] = 0.1 * w[0, 6:]
    w[1, :6] = torch.tensor([12.0, 30.0, -15.0, 1.0, 1.5, -1.0])
    w[2] = 0.0
    w[3, :2] = -2.0
    return w.to(device, dtype)


def _peaks(w: Tensor, per_channel: bool) -> Tensor:
    t = torch.tanh(w).abs().float()
    top = t.amax(1, keepdim=True) if per_channel else t.amax()
    return t == top


# --- the checks: (device, dtype, bits) -> None or the reason ------------------------------------


def _check_act_quant(device, dtype, bits) -> str | None:
    x = _activations(device, dtype)
    for k in range(1, 9):
        for need_mask in (True, False):
            got, want = _triton().act_quant_forward(x, k, need_mask), eager.act_forward_torch(x, k, need_mask)
            reason = _first(_differ(got[0], want[0], f"the output (bits={k})"), _differ(got[1], want[1], "the mask") if need_mask else None)
            if reason:
                return reason
    return None


def _check_masked_grad(device, dtype, bits) -> str | None:
    grad = _randn((16, 256), 13)
    grad.view(-1)[:4] = torch.tensor([-0.0, 1e30, -3.0, 0.0])
    mask = (torch.rand((16, 256), generator=torch.Generator().manual_seed(14)) < 0.6).to(torch.uint8)
    grad, mask = grad.to(device, dtype), mask.to(device)
    return _differ(_triton().masked_grad(grad, mask), eager.masked_grad_torch(grad, mask), "the gradient")


def _check_dorefa_weight(device, dtype, bits) -> str | None:
    w = _weights(device, dtype)
    for per_channel in (False, True):
        t = torch.tanh(w)
        for k in range(2, 9):
            q, s = _triton().dorefa_forward(t, k, per_channel)
            want_q, _, want_s = eager.dorefa_forward(w, k, per_channel)
            where = f"(bits={k}, per_channel={per_channel})"
            reason = _first(_differ(q, want_q, f"the output {where}"), _differ(s, want_s, f"the scale {where}"))
            if reason:
                return reason
    return None


def _check_dorefa_weight_backward(device, dtype, bits) -> str | None:
    w = _weights(device, dtype)
    grad = _randn(w.shape, 15).to(device, dtype)
    for per_channel in (False, True):
        _, t, s = eager.dorefa_forward(w, 4, per_channel)
        got = _triton().dorefa_backward(grad, t, s, per_channel)
        want = eager.dorefa_backward(grad, t, s, per_channel)
        reason = _differ(got, want, f"the gradient (per_channel={per_channel})", ~_peaks(w, per_channel), PEAK_GRAD_RTOL.get(dtype, 1e-5))
        if reason:
            return reason
    return None


def _check_binary_weight(device, dtype, bits) -> str | None:
    w = _weights(device, dtype)
    for per_channel in (False, True):
        got = _triton().binary_forward(w, eager.binary_scale(w, per_channel))
        reason = _differ(got, eager.binary_forward(w, per_channel), f"the output (per_channel={per_channel})")
        if reason:
            return reason
    return None


def _unit_edges(device, dtype) -> Tensor:
    x = 0.7 * _randn((4, 3, 16, 16), 16)
    x.view(-1)[:6] = torch.tensor([1.0, -1.0, 0.0, 1.5, 1.0000001, -0.0])
    return x.to(device, dtype)


def _check_inside_unit(device, dtype, bits) -> str | None:
    x = _unit_edges(device, dtype)
    return _differ(_triton().inside_unit(x), eager.inside_unit(x), "the mask")


def _check_aqe(device, dtype, bits) -> str | None:
    x = _unit_edges(device, dtype)
    for per_sample in (False, True):
        dims = tuple(range(1, x.dim())) if per_sample else None
        threshold = eager.aqe_threshold(x, dims) if bits == 2 else None
        for alpha in (0.5, 1.0):
            for need_mask in (True, False):
                y, mask = _triton().aqe_forward(x, bits, alpha, threshold, need_mask)
                where = f"(bits={bits}, alpha={alpha}, per_sample={per_sample})"
                reason = _first(_differ(y, eager.aqe_forward(x, bits, alpha, dims), f"the output {where}"),
                                _differ(mask, eager.inside_unit(x), "the mask") if need_mask else None)  # fmt: skip
                if reason:
                    return reason
    return None


CHECKS = {
    "act_quant": _check_act_quant,
    "masked_grad": _check_masked_grad,
    "dorefa_weight": _check_dorefa_weight,
    "dorefa_weight_backward": _check_dorefa_weight_backward,
    "binary_weight": _check_binary_weight,
    "inside_unit": _check_inside_unit,
    "aqe": _check_aqe,
}
"""One check per operator that runs a Triton kernel, named as the operator (``distq::act_quant``...)."""
