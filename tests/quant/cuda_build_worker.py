"""Compile every Triton kernel of distq.quant.triton_kernels for a CUDA GPU on a machine without
one, and print each compiled kernel's floating-point PTX instructions as JSON.

Usage: python cuda_build_worker.py CAPABILITY [CAPABILITY ...]   (e.g. 80 90)

Triton's CPU interpreter (which the default tests use) executes the kernels with numpy: it
accepts code the CUDA compiler rejects, and divides, rounds and fuses as numpy does. Here the
real compiler runs (Triton to PTX to a cubin with the ptxas in Triton's wheel), with the
specializations a CUDA tensor gets (RECIPROCAL: PyTorch's reciprocal division by a scalar), over
the same calls the quantizer operators make, fp32 and bf16. The driver is replaced by one that
names a target and never touches a device; no kernel is launched.
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.driver import CudaDriver  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

FLOAT_OP = re.compile(r"\b((?:add|sub|mul|div|fma|rcp|sqrt|cvt|max|min)\.[A-Za-z0-9.]*(?:f32|f64|bf16)[a-z0-9.]*)")


class OfflineCuda(CudaDriver):
    """The CUDA driver's argument types and backend, a fixed target, no device."""

    def __init__(self, capability: int):
        self.capability = capability

    def get_current_target(self):
        return GPUTarget("cuda", self.capability, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def compile_all(capability: int) -> dict[str, list[dict[str, int]]]:
    """{kernel name: [PTX float-op counts of each specialization compiled]}."""
    import distq.quant.triton_kernels as K

    built: dict[str, list[dict[str, int]]] = collections.defaultdict(list)
    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        built[self.fn.__name__].append(dict(collections.Counter(FLOAT_OP.findall(kernel.asm["ptx"]))))
        assert kernel.asm.get("cubin"), f"{self.fn.__name__}: ptxas produced no cubin"
        return kernel

    driver.set_active(OfflineCuda(capability))
    JITFunction.run = compile_only
    scalar_division = K._scalar_division
    K._scalar_division = lambda x, divisor: {**scalar_division(x, divisor), "RECIPROCAL": True}  # what a CUDA tensor gets
    try:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(3000).to(dtype)
            for need_mask in (True, False):
                K.act_quant_forward(x, 4, need_mask)
            K.masked_grad(x, torch.ones(3000, dtype=torch.uint8))
            t = torch.randn(8, 3, 3, 3).tanh().to(dtype)
            for per_channel in (False, True):
                _, s = K.dorefa_forward(t, 4, per_channel)
                K.dorefa_backward(torch.randn(t.shape).to(dtype), t, s.abs() + 1, per_channel)
            K.binary_forward(t, torch.ones(8, dtype=dtype))
            K.inside_unit(x)
            for bits in (1, 2, 3, 8):
                threshold = torch.ones(10, dtype=dtype) if bits == 2 else None
                for alpha in (0.5, 1.0):
                    K.aqe_forward(x.view(10, 300), bits, alpha, threshold, True)
    finally:
        JITFunction.run = launch
        K._scalar_division = scalar_division
    return dict(built)


if __name__ == "__main__":
    print(json.dumps({cap: compile_all(int(cap)) for cap in sys.argv[1:]}))
