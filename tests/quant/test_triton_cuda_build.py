"""The Triton kernels as the CUDA compiler builds them, checked without a GPU.

The default suite runs the kernels under Triton's CPU interpreter, which executes them with
numpy: exact IEEE division, no FMA contraction, and a language check looser than the
compiler's. Here every kernel is compiled for the GPUs distq targets (sm_80: A100, sm_90:
H100/H200) by the real compiler and ptxas (tests/quant/cuda_build_worker.py), and its PTX is
read for the instructions that would break bit-equality with PyTorch on CUDA:

- ``div.full.f32`` / ``div.approx``: Triton's ``/`` on fp32 is an approximate division on
  CUDA (up to 2 ulp); PyTorch divides tensors with ``div.rn``.
- ``fma``: an FMA rounds once where PyTorch's kernels round twice; only the DoReFa weight
  backward asks for one, as PyTorch's compiled ``tanh_backward`` does.
- ``rcp.approx``: an approximate reciprocal.
- ``max.f32`` / ``min.f32`` without ``.NaN``: CUDA's max and min return the other operand
  for a NaN, where PyTorch's clamp and amax return NaN (a diverged run would be hidden).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import distq.quant.triton_kernels as K

WORKER = Path(__file__).with_name("cuda_build_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
CAPABILITIES = ("80", "90", "100")
EXPLICIT_FMA = {"_dorefa_backward"}  # tl.fma(-t, t, 1): PyTorch's tanh_backward contracts 1 - t*t


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("triton-cache")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "TRITON_CACHE_DIR": str(cache), "HOME": str(cache)}
    done = subprocess.run([sys.executable, str(WORKER), *CAPABILITIES], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def launched_kernels() -> set[str]:
    """The kernels the wrappers launch (``_name[grid](...)``), found in the module's source."""
    import inspect
    import re

    return set(re.findall(r"\b(_[a-z_]+)\[", inspect.getsource(K))) - {"_grid"}


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_every_kernel_compiles_for_the_gpu(built, capability):
    kernels = built[capability]
    assert launched_kernels() <= kernels.keys(), f"not compiled: {launched_kernels() - kernels.keys()}"
    assert len(kernels) >= 8


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_compiled_kernels_divide_and_round_as_pytorch(built, capability):
    problems = []
    for name, variants in built[capability].items():
        for ops in variants:
            for op in ops:
                if op.startswith(("div.full", "div.approx", "rcp.approx", "sqrt.approx")):
                    problems.append(f"{name}: {op} (approximate)")
                if op.startswith(("max.", "min.")) and ".NaN." not in op:
                    problems.append(f"{name}: {op} (drops NaN)")
                if op.startswith("fma") and name not in EXPLICIT_FMA:
                    problems.append(f"{name}: {op} (a contracted multiply-add)")
    assert not problems, "\n".join(sorted(set(problems)))
    # The divisions the DoReFa kernels do are there, and IEEE-rounded: the check above has something to see.
    assert any(op.startswith("div.rn.f32") for ops in built[capability]["_dorefa_forward"] for op in ops)
    assert any(op.startswith("fma.rn.f32") for ops in built[capability]["_dorefa_backward"] for op in ops)
    assert any(op.startswith("max.NaN.f32") for ops in built[capability]["_row_max_abs"] for op in ops)
    # bf16 results are rounded to nearest even when stored.
    assert any(op.startswith("cvt.rn.bf16.f32") for ops in built[capability]["_act_forward"] for op in ops)
