"""The compiled kernels through ctypes: the C structures of ``bitops_api.h``, field for field,
and the one place that decides whether this process has native kernels at all.

``load()`` builds (if needed) and loads the library once per process. Where that fails it
says so in one line on stderr, once, and returns None: the integer engine and the CPU
quantizers then run their torch reference kernels.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import torch  # first: the library's libgomp.so.1 must resolve to the one torch loaded

from distq.native.build import BuildError, build

MAX_PLANES = 32
ISAS = ("portable", "avx2", "avx512")
ELEMENT_KINDS = {torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3}
OUT_KINDS = {torch.float32: 0, torch.float64: 1, torch.int64: 2}
ISA_ENV = "DISTQ_NATIVE_ISA"
"""Force an instruction set (portable, avx2, avx512): to test or time each path on one machine."""
DISABLE_ENV = "DISTQ_NATIVE"
"""DISTQ_NATIVE=0 keeps every engine on the torch reference kernels."""


class Code(ctypes.Structure):
    """dq_code: how one operand's integers split into planes, x = sum_i (-1)^neg_i 2^shift_i x_i."""

    _fields_ = [
        ("planes", ctypes.c_int32),
        ("sign", ctypes.c_int32),
        ("shift", ctypes.c_int32 * MAX_PLANES),
        ("negative", ctypes.c_int32 * MAX_PLANES),
    ]


class Layer(ctypes.Structure):
    """dq_layer: a packed weight and its conv geometry."""

    _fields_ = [
        ("words", ctypes.c_void_p),
        ("out", ctypes.c_int64),
        ("out_padded", ctypes.c_int64),
        ("k_words", ctypes.c_int64),
        ("offset", ctypes.c_int64),
        ("in_channels", ctypes.c_int32),
        ("kernel_h", ctypes.c_int32),
        ("kernel_w", ctypes.c_int32),
        ("stride_h", ctypes.c_int32),
        ("stride_w", ctypes.c_int32),
        ("pad_h", ctypes.c_int32),
        ("pad_w", ctypes.c_int32),
        ("code", Code),
    ]


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    signatures = {
        "dq_pack": [p, i32, i64, i64, p, p, i32],
        "dq_bit_conv": [p, p, p, i32, i64, i64, i64, p, p, p, i32, i32, p, p, i32],
        "dq_quantize_unit": [p, i32, i64, i32, p, p, i32],
        "dq_affine_to_channels_last": [p, i32, i64, i64, i64, p, p, i32, p, p, i32],
        "dq_max_pool_codes": [p, i64, i64, i64, i64, p, p, i32, p, p, i32],
        "dq_affine_quantize_pool": [p, i32, i64, i64, i64, i64, p, p, i32, p, p, p, i32],
        "dq_act_quant_train": [p, p, p, i64, i32, i32],
        "dq_masked_grad_train": [p, p, p, i64, i32],
        "dq_dorefa_forward_train": [p, p, p, i64, i64, i32, i32],
        "dq_dorefa_backward_terms": [p, p, p, p, p, i64, i64, i32],
        "dq_dorefa_backward_grad": [p, p, p, p, p, i64, i64, i32],
        "dq_profile": [i32, p],
        "dq_best_isa": [],
        "dq_set_isa": [i32],
        "dq_current_isa": [],
        "dq_isa_name": [i32],
    }
    for name, args in signatures.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = {"dq_isa_name": ctypes.c_char_p, "dq_profile": None}.get(name, ctypes.c_int)
    return lib


_state: dict = {}


def load() -> ctypes.CDLL | None:
    """The loaded library, or None (after one line on stderr) where it cannot be built."""
    if "lib" not in _state:
        _state["lib"] = _load_or_explain()
    return _state["lib"]


def _load_or_explain() -> ctypes.CDLL | None:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    try:
        path = build()
        lib = _declare(ctypes.CDLL(str(path)))
    except (BuildError, OSError, AttributeError) as exc:  # AttributeError: a library without one of the functions
        print(
            f"distq: note: native kernels unavailable ({exc}); the integer engine and the CPU quantizers "
            "use their torch reference kernels, which are exact but slower (the engine about 10-40x)",
            file=sys.stderr,
            flush=True,
        )
        return None
    forced = os.environ.get(ISA_ENV)
    if forced:
        set_isa(lib, forced)
    return lib


def set_isa(lib: ctypes.CDLL, name: str) -> None:
    """Run the kernels of instruction set ``name`` from now on (ValueError if this CPU lacks it)."""
    if name not in ISAS or lib.dq_set_isa(ISAS.index(name)) != 0:
        supported = [n for i, n in enumerate(ISAS) if lib.dq_isa_name(i) != b"unsupported"]
        raise ValueError(f"instruction set {name!r} is not available here ({', '.join(supported)} are)")


def isa(lib: ctypes.CDLL) -> str:
    return ISAS[lib.dq_current_isa()]


def available_isas(lib: ctypes.CDLL) -> list[str]:
    return [n for i, n in enumerate(ISAS) if lib.dq_isa_name(i) != b"unsupported"]


def library_path(lib: ctypes.CDLL) -> Path:
    return Path(lib._name)


def on_every_isa(run) -> dict:
    """{instruction set: run()} for every instruction set this CPU supports (for tests and
    benchmarks); the one that was selected is selected again afterwards."""
    lib = load()
    selected = isa(lib)
    try:
        results = {}
        for name in available_isas(lib):
            set_isa(lib, name)
            results[name] = run()
        return results
    finally:
        set_isa(lib, selected)
