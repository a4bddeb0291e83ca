"""The activation quantizer's one-pass CPU loops from distq's native library (``distq.native``).

``distq.quant.eager`` computes the k-bit activation quantizer in five PyTorch passes (clamp, the
mask's comparison, multiply, round, divide) and its backward as a product with a uint8 mask; on
the CPU those passes, not the arithmetic, are most of a W4A4 step's extra time. The library
does each in one loop with the same float operations in the same order, so the results are
bit-identical (tests/quant/test_native_cpu.py). It takes fp32, dense (contiguous or
channels-last) CPU tensors with matching layouts; anything else, a process where the library
does not load, or ``DISTQ_NATIVE=0`` returns None and the caller runs the PyTorch passes.
"""

from __future__ import annotations

import torch

from distq.native.library import load


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
