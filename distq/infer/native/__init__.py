"""Native bit kernels for the integer engine, on torch tensors.

The C++ library itself (``bitops_api.h``, ``isa_*.cpp`` for AVX-512 (VPOPCNTDQ), AVX2 and plain
C++ chosen at run time by ``entry.cpp``) is built and loaded by ``distq.native``, which the CPU
quantizers use too; ``ops.py`` here runs the bit kernels on torch tensors. The torch kernels of
``distq.infer.bitops`` stay the reference that these must equal.
"""

from __future__ import annotations

KERNEL_CHOICES = ("auto", "native", "reference")
"""auto: native where they build, else reference (with a one-line note); native: required."""


def use_native(kernels: str) -> bool:
    """Whether an engine built with ``kernels`` runs the native kernels."""
    from distq.errors import DistqError
    from distq.native.library import load

    if kernels not in KERNEL_CHOICES:
        raise DistqError(f"integer engine kernels must be one of {', '.join(KERNEL_CHOICES)}, not {kernels!r}")
    if kernels == "reference":
        return False
    available = load() is not None
    if kernels == "native" and not available:
        raise DistqError("the native bit kernels are not available on this machine (see the note above); use kernels='auto'")
    return available


def describe() -> str:
    """'native (avx512)' or 'reference', for reports and benchmarks."""
    from distq.native.library import isa, load

    lib = load()
    return "reference" if lib is None else f"native ({isa(lib)})"
