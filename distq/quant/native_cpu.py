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
"""

from __future__ import annotations

import contextlib

import torch

from distq.native import library

_off = [False]


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


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _usable(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.numel() > 0 and _dense(t)


def act_forward(x: torch.Tensor, bits: int, need_mask: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(a_q, mask) as ``eager.act_forward_torch`` gives them, or None where the library cannot run."""
    if not _usable(x):
        return None
    lib = load()
    if lib is None:
        return None
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
    lib = load()
    if lib is None:
        return None
    out = torch.empty_like(grad)
    if lib.dq_masked_grad_train(grad.data_ptr(), mask.data_ptr(), out.data_ptr(), grad.numel(), torch.get_num_threads()) != 0:
        return None
    return out


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
    lib = load() if rows is not None and _scales(s, rows) else None
    if lib is None:
        return None
    q = torch.empty_like(t)
    if lib.dq_dorefa_forward_train(t.data_ptr(), s.data_ptr(), q.data_ptr(), rows, t.numel() // rows, (1 << bits) - 1, torch.get_num_threads()) != 0:
        return None
    return q


def dorefa_backward_terms(t: torch.Tensor, s: torch.Tensor, grad: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(terms, peaks): (t / 2s) / 2s * grad elementwise, and per row the number of |t| == s (int64)."""
    rows = _rows(t, per_channel)
    lib = load() if rows is not None and _scales(s, rows) and grad.stride() == t.stride() and _usable(grad) else None
    if lib is None:
        return None
    terms = torch.empty_like(t)
    peaks = torch.empty(rows, dtype=torch.int64)
    status = lib.dq_dorefa_backward_terms(t.data_ptr(), s.data_ptr(), grad.data_ptr(), terms.data_ptr(), peaks.data_ptr(), rows,
                                          t.numel() // rows, torch.get_num_threads())  # fmt: skip
    return (terms, peaks) if status == 0 else None


def dorefa_backward_grad(t: torch.Tensor, s: torch.Tensor, share: torch.Tensor, grad: torch.Tensor, per_channel: bool) -> torch.Tensor | None:
    """copysign(|t| == s, t) * share + grad / s elementwise: the gradient before tanh'."""
    rows = _rows(t, per_channel)
    usable = rows is not None and _scales(s, rows) and _scales(share, rows) and grad.stride() == t.stride() and _usable(grad)
    lib = load() if usable else None
    if lib is None:
        return None
    out = torch.empty_like(t)
    status = lib.dq_dorefa_backward_grad(t.data_ptr(), s.data_ptr(), share.data_ptr(), grad.data_ptr(), out.data_ptr(), rows,
                                         t.numel() // rows, torch.get_num_threads())  # fmt: skip
    return out if status == 0 else None
