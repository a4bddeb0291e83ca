"""The quantizers' one-pass CPU loops from distq's native library (``distq.native``).

``distq.quant.eager`` computes the k-bit activation quantizer in five PyTorch passes (clamp, the
mask's comparison, multiply, round, divide) and its backward as a product with a uint8 mask;
the DoReFa weight quantizer's forward in six passes after tanh and its backward in about ten.
On the CPU those passes, not the arithmetic, are most of a W4A4 step's extra time. The library
does each elementwise stretch in one loop with the same float operations in the same order, so
the results are bit-identical (tests/quant/test_native_cpu.py); tanh, tanh' and every sum over
a tensor stay PyTorch's (a sum's order is part of the result). The loops take fp32, dense
(contiguous or channels-last; per-channel weights contiguous) CPU tensors with matching
layouts; anything else, a process where the library does not load, or ``DISTQ_NATIVE=0``
returns None and the caller runs the PyTorch passes.

Each loop checks itself at its first use in a process: it runs on a small deterministic probe
(every bit-width, the edges of [0, 1], rounding ties, -0, NaN, infinities, the maximum |tanh w|
reached several times, an all-zero row, per tensor and per channel) and must give the bits of
its PyTorch passes (``REFERENCES``, which ``distq.quant.eager`` fills in: this module does not
import it). A loop that disagrees, fails or returns an error is not used again in the process
(its callers run the PyTorch passes), with one line on stderr saying so. A library that does
not load at all says so once in ``distq.native.library``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

import torch

from distq.native import library

_off = [False]
REFERENCES: dict[str, Callable] = {}
"""The PyTorch passes each loop is checked against (set by ``distq.quant.eager``): ``act_quant``
(x, bits, need_mask), ``masked_grad`` (grad, mask), ``dorefa_forward`` (t, s, bits) and
``dorefa_backward`` (grad, t, s, per_channel)."""
_verdicts: dict[str, bool] = {}
"""loop -> whether it agreed with its PyTorch passes (checked once per process)."""
checks_run: list[str] = []
"""The loops checked in this process, in order (tests count them)."""


def reset() -> None:
    """Forget every verdict (tests)."""
    _verdicts.clear()
    checks_run.clear()


@contextlib.contextmanager
def pytorch_passes_only():
    """Within the block the quantizers run PyTorch's passes, not the loops (to compare the two)."""
    before, _off[0] = _off[0], True
    try:
        yield
    finally:
        _off[0] = before


def load():
    """The native library, or None where it does not load or inside ``pytorch_passes_only``."""
    return None if _off[0] else library.load()


def _checked(name: str):
    """The library where loop ``name`` may run (it loads and agreed with its PyTorch passes), else None."""
    lib = load()
    if lib is None:
        return None
    if name not in _verdicts:
        reason = _self_check(name, lib)
        _verdicts[name] = reason is None
        if reason is not None:
            print(f"distq: warning: native CPU loop {name} ({_isa(lib)}) {reason}: using the PyTorch passes for this run", file=sys.stderr, flush=True)
    return lib if _verdicts[name] else None


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _usable(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.numel() > 0 and _dense(t)


# --- activations -------------------------------------------------------------------------------


def act_forward(x: torch.Tensor, bits: int, need_mask: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(a_q, mask) as ``eager.act_forward_torch`` gives them, or None where the library cannot run."""
    if not _usable(x):
        return None
    lib = _checked("act_quant")
    return None if lib is None else _act_loop(lib, x, bits, need_mask)


def _act_loop(lib, x: torch.Tensor, bits: int, need_mask: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    y = torch.empty_like(x)  # same layout as x (dense): the loop runs over storage order
    mask = torch.empty_like(x, dtype=torch.uint8) if need_mask else x.new_empty((0,), dtype=torch.uint8)
    status = lib.dq_act_quant_train(x.data_ptr(), y.data_ptr(), mask.data_ptr() if need_mask else None, x.numel(),
                                    (1 << bits) - 1, torch.get_num_threads())  # fmt: skip
    if status != 0:
        return None
    return y, mask


def masked_grad(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """grad * mask as ``eager.masked_grad_torch`` gives it, or None where the library cannot run."""
    if not _usable(grad) or mask.shape != grad.shape or mask.stride() != grad.stride() or mask.dtype != torch.uint8:
        return None
    lib = _checked("masked_grad")
    return None if lib is None else _masked_loop(lib, grad, mask)


def _masked_loop(lib, grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    out = torch.empty_like(grad)
    if lib.dq_masked_grad_train(grad.data_ptr(), mask.data_ptr(), out.data_ptr(), grad.numel(), torch.get_num_threads()) != 0:
        return None
    return out


# --- DoReFa weights ------------------------------------------------------------------------------


def _rows(t: torch.Tensor, per_channel: bool) -> int | None:
    """How many scale rows the loops see for weight ``t``, or None where they cannot run."""
    if not _usable(t):
        return None
    if per_channel and t.dim() > 1:
        return t.shape[0] if t.is_contiguous() else None
    return 1


def _scales(s: torch.Tensor, rows: int) -> bool:
    return s.dtype == torch.float32 and s.numel() == rows and s.is_contiguous()


def dorefa_forward(t: torch.Tensor, s: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor | None:
    """q = 2 Q(t / (2 s) + 1/2) - 1 from t = tanh(w) and the scale s, as ``eager.dorefa_forward`` rounds it."""
    rows = _rows(t, per_channel)
    lib = _checked("dorefa_forward") if rows is not None and _scales(s, rows) else None
    return None if lib is None else _dorefa_forward_loop(lib, t, s, rows, bits)


def _dorefa_forward_loop(lib, t: torch.Tensor, s: torch.Tensor, rows: int, bits: int) -> torch.Tensor | None:
    q = torch.empty_like(t)
    if lib.dq_dorefa_forward_train(t.data_ptr(), s.data_ptr(), q.data_ptr(), rows, t.numel() // rows, (1 << bits) - 1, torch.get_num_threads()) != 0:
        return None
    return q


def _terms_usable(t, s, grad, per_channel) -> int | None:
    rows = _rows(t, per_channel)
    return rows if rows is not None and _scales(s, rows) and grad.stride() == t.stride() and _usable(grad) else None


def dorefa_backward_terms(t: torch.Tensor, s: torch.Tensor, grad: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(terms, peaks): (t / 2s) / 2s * grad elementwise, and per row the number of |t| == s (int64)."""
    rows = _terms_usable(t, s, grad, per_channel)
    lib = _checked("dorefa_backward") if rows is not None else None
    return None if lib is None else _terms_loop(lib, t, s, grad, rows)


def _terms_loop(lib, t, s, grad, rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    terms = torch.empty_like(t)
    peaks = torch.empty(rows, dtype=torch.int64)
    status = lib.dq_dorefa_backward_terms(t.data_ptr(), s.data_ptr(), grad.data_ptr(), terms.data_ptr(), peaks.data_ptr(), rows,
                                          t.numel() // rows, torch.get_num_threads())  # fmt: skip
    return (terms, peaks) if status == 0 else None


def dorefa_backward_grad(t: torch.Tensor, s: torch.Tensor, share: torch.Tensor, grad: torch.Tensor, per_channel: bool) -> torch.Tensor | None:
    """copysign(|t| == s, t) * share + grad / s elementwise: the gradient before tanh'."""
    rows = _terms_usable(t, s, grad, per_channel)
    lib = _checked("dorefa_backward") if rows is not None and _scales(share, rows) else None
    return None if lib is None else _grad_loop(lib, t, s, share, grad, rows)


def _grad_loop(lib, t, s, share, grad, rows: int) -> torch.Tensor | None:
    out = torch.empty_like(t)
    status = lib.dq_dorefa_backward_grad(t.data_ptr(), s.data_ptr(), share.data_ptr(), grad.data_ptr(), out.data_ptr(), rows,
                                         t.numel() // rows, torch.get_num_threads())  # fmt: skip
    return out if status == 0 else None


def dorefa_backward(grad: torch.Tensor, t: torch.Tensor, s: torch.Tensor, per_channel: bool) -> torch.Tensor | None:
    """``eager.dorefa_backward``'s gradient in two loops around PyTorch's sum and ``tanh_backward``
    (the same values as the PyTorch passes, two passes instead of eight), or None."""
    rows = _terms_usable(t, s, grad, per_channel)
    lib = _checked("dorefa_backward") if rows is not None else None
    return None if lib is None else _dorefa_backward_loops(lib, grad, t, s, per_channel, rows)


def _dorefa_backward_loops(lib, grad, t, s, per_channel: bool, rows: int) -> torch.Tensor | None:
    parts = _terms_loop(lib, t, s, grad, rows)
    if parts is None:
        return None
    terms, peaks = parts
    total = terms.sum(dim=tuple(range(1, t.dim())), keepdim=True) if per_channel and t.dim() > 1 else terms.sum()
    share = -4 * total / peaks.view(s.shape).to(t.dtype).clamp_min_(1)
    grad_t = _grad_loop(lib, t, s, share.contiguous(), grad, rows)
    if grad_t is None:
        return None
    return torch.ops.aten.tanh_backward.grad_input(grad_t, t, grad_input=grad_t)


# --- the self-check: each loop against its PyTorch passes, once per process ---------------------

SPECIAL = [0.0, -0.0, 1.0, -1e-30, 1.0000001, 0.5, float("nan"), float("inf"), -float("inf"), 1e-45, -1.0, 2.0]


def _isa(lib) -> str:
    try:
        return library.isa(lib)
    except Exception:
        return "unknown instruction set"


def _self_check(name: str, lib) -> str | None:
    checks_run.append(name)
    if name not in REFERENCES:
        return "has no PyTorch passes to be checked against (distq.quant.eager not imported)"
    try:
        with torch.no_grad():
            return CHECKS[name](lib, REFERENCES[name])
    except Exception as exc:  # a loop that raises (a broken library): the PyTorch passes, and say why
        message = " ".join(str(exc).split())[:200]
        return f"failed ({type(exc).__name__}: {message})" if message else f"failed ({type(exc).__name__})"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _mismatch(got, want: torch.Tensor, what: str) -> str | None:
    """None where ``got`` has the bits of ``want``, else the reason (the largest difference)."""
    if got is None:
        return f"returned an error status ({what})"
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"disagrees with the PyTorch passes ({what}: {got.dtype} {tuple(got.shape)} instead of {want.dtype} {tuple(want.shape)})"
    differ = _bits(got) != _bits(want)
    if not bool(differ.any()):
        return None
    g, w = got.double().flatten(), want.double().flatten()
    gap = torch.where(differ.flatten(), (g - w).abs().nan_to_num(float("inf")), -1.0)
    at = int(gap.argmax())
    return f"disagrees with the PyTorch passes (max |diff| {max(gap[at].item(), 0.0):.4g} at element {at} of {what}: {g[at].item():.6g} instead of {w[at].item():.6g})"


def _probe_activations() -> torch.Tensor:
    x = 1.5 * torch.randn((16, 256), generator=torch.Generator().manual_seed(21)) + 0.4
    flat = x.view(-1)
    flat[: len(SPECIAL)] = torch.tensor(SPECIAL)
    at = len(SPECIAL)
    for bits in range(1, 9):  # every rounding tie of every bit-width
        levels = (1 << bits) - 1
        flat[at : at + levels + 1] = (torch.arange(levels + 1) + 0.5) / levels
        at += levels + 1
    return x


def _check_act_quant(lib, reference) -> str | None:
    x = _probe_activations()
    for bits in range(1, 9):
        for need_mask in (True, False):
            got = _act_loop(lib, x, bits, need_mask)
            y, mask = reference(x, bits, need_mask)
            reason = _mismatch(None if got is None else got[0], y, f"the output (bits={bits})")
            if reason is None and need_mask:
                reason = _mismatch(got[1], mask, f"the mask (bits={bits})")
            if reason:
                return reason
    return None


def _check_masked_grad(lib, reference) -> str | None:
    grad = torch.randn((16, 256), generator=torch.Generator().manual_seed(22))
    grad.view(-1)[: len(SPECIAL)] = torch.tensor(SPECIAL)
    mask = (torch.rand((16, 256), generator=torch.Generator().manual_seed(23)) < 0.6).to(torch.uint8)
    return _mismatch(_masked_loop(lib, grad, mask), reference(grad, mask), "the gradient")


def _probe_weights() -> torch.Tensor:
    """4 x 576: the maximum |tanh w| three times with both signs, tanh saturating to +-1, an all-zero row."""
    w = 0.05 * torch.randn((4, 576), generator=torch.Generator().manual_seed(24))
    w[0, :6] = torch.tensor([0.5, -0.5, 0.2, 0.5, 0.0, -0.0])
    w[0, 6:] *= 0.1
    w[1, :6] = torch.tensor([12.0, 30.0, -15.0, 1.0, 1.5, -1.0])
    w[2] = 0.0
    w[3, :2] = -2.0
    return w


def _tanh_and_scale(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tanh(w)
    s = t.abs().amax(dim=1, keepdim=True) if per_channel else t.abs().amax()
    return t, s.masked_fill(s == 0, 1.0)


def _check_dorefa_forward(lib, reference) -> str | None:
    w = _probe_weights()
    for per_channel in (False, True):
        t, s = _tanh_and_scale(w, per_channel)
        for bits in range(2, 9):
            reason = _mismatch(_dorefa_forward_loop(lib, t, s, s.numel(), bits), reference(t, s, bits), f"the output (bits={bits}, per_channel={per_channel})")
            if reason:
                return reason
    return None


def _check_dorefa_backward(lib, reference) -> str | None:
    w = _probe_weights()
    grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(25))
    for per_channel in (False, True):
        t, s = _tanh_and_scale(w, per_channel)
        got = _dorefa_backward_loops(lib, grad, t, s, per_channel, s.numel())
        reason = _mismatch(got, reference(grad, t, s, per_channel), f"the gradient (per_channel={per_channel})")
        if reason:
            return reason
    return None


CHECKS = {
    "act_quant": _check_act_quant,
    "masked_grad": _check_masked_grad,
    "dorefa_forward": _check_dorefa_forward,
    "dorefa_backward": _check_dorefa_backward,
}
