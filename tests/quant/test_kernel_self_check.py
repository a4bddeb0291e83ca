"""The quantizer kernels check themselves at their first use (distq.quant.kernel_check for the
Triton kernels, distq.quant.native_cpu for the native CPU loops) and fall back to the PyTorch
kernels where they fail or disagree.

Without a GPU, ``auto`` picks the Triton kernels only for CUDA tensors: DISTQ_TRITON_ON_CPU=1
(test only) makes it pick them on the CPU too, under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1). A wrong kernel is a real one whose output is shifted afterwards; a raising
one raises before running.

- a W4A4 ResNet trained a few steps with every Triton kernel it uses wrong, under ``auto``: one
  warning line per kernel, and the same parameters to the bit as with ``quant.kernels=torch``;
- ``quant.kernels=triton`` with a wrong kernel: one error (a one-line DistqError; through the CLI
  one ``distq: error:`` line and exit status 2);
- a raising kernel falls back as a wrong one does; the real kernels and loops pass the check;
- the check runs once per process and kernel; under torch.compile at the first real call;
- a wrong or raising native loop: one line, and the PyTorch passes' results.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from distq.config import load_config
from distq.errors import DistqError
from distq.models.build import build_model
from distq.native.library import load as load_native
from distq.quant import eager, kernel_check, native_cpu, triton_kernels
from distq.quant.functional import act_quant, aqe_quant, weight_quant

TRAINING_KERNELS = {  # the Triton functions a DoReFa W4A4 step runs, by the check's kernel names
    "act_quant": "act_quant_forward",
    "masked_grad": "masked_grad",
    "dorefa_weight": "dorefa_forward",
    "dorefa_weight_backward": "dorefa_backward",
}


@pytest.fixture(autouse=True)
def fresh_verdicts():
    """Each test checks the kernels afresh, and leaves no verdict about a patched kernel behind."""
    kernel_check.reset()
    native_cpu.reset()
    yield
    kernel_check.reset()
    native_cpu.reset()


@pytest.fixture
def triton_on_cpu(monkeypatch):
    monkeypatch.setenv("DISTQ_TRITON_ON_CPU", "1")


def shifted(fn, by: float = 0.25):
    """``fn`` returning its first floating-point tensor shifted by ``by``: a wrong kernel."""

    def wrong(*args, **kwargs):
        out = fn(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] + by, *out[1:])
        return out + by

    return wrong


def raising(*args, **kwargs):
    raise RuntimeError("out of resources: shared memory, required: 300000")


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("distq: warning:")]


def train(kernels: str, steps: int = 3) -> dict[str, torch.Tensor]:
    """A W4A4 width-4 ResNet-18 (DoReFa, 16x16 inputs) after a few SGD steps; its parameters."""
    cfg = load_config(None, ["model.width=4", "model.small_input=true", "quant.w_bits=4", "quant.a_bits=4", f"quant.kernels={kernels}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.quant, 10).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_wrong_triton_kernels_fall_back_with_one_line_each_and_train_as_pytorch(monkeypatch, triton_on_cpu, capsys):
    for function in TRAINING_KERNELS.values():
        monkeypatch.setattr(triton_kernels, function, shifted(getattr(triton_kernels, function)))
    got = train("auto")
    lines = warnings(capsys.readouterr().err)
    assert sorted(kernel_check.checks_run) == sorted(TRAINING_KERNELS)  # each checked once, over 3 steps
    assert len(lines) == len(TRAINING_KERNELS), lines
    for kernel in TRAINING_KERNELS:
        (line,) = [line for line in lines if f"Triton kernel {kernel} on cpu (float32) disagrees" in line]
        assert "max |diff| 0.25" in line and line.endswith(": using the PyTorch kernel for this run"), line
    want = train("torch")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_with_quant_kernels_triton_a_wrong_kernel_is_one_error(monkeypatch, capsys):
    monkeypatch.setattr(triton_kernels, "act_quant_forward", shifted(triton_kernels.act_quant_forward))
    with pytest.raises(DistqError) as caught:
        train("triton", steps=1)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("Triton kernel act_quant on cpu (float32) disagrees with the PyTorch kernel (max |diff| 0.25")
    assert "use quant.kernels=auto" in message and "quant.kernels=torch" in message
    assert warnings(capsys.readouterr().err) == []  # no fallback, no warning


def test_through_the_cli_a_wrong_kernel_under_triton_is_one_error_line_and_exit_2(tmp_path, tiny_args, digits_root, distq_cache):
    script = (
        "import sys\n"
        "from distq.quant import triton_kernels\n"
        "real = triton_kernels.masked_grad\n"
        "triton_kernels.masked_grad = lambda *a, **k: real(*a, **k) * 2 + 1\n"
        "from distq.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = tiny_args(tmp_path / "run", "quant.kernels=triton", "data.batch_size=16")  # small: the interpreter runs the forward
    env = {**os.environ, "DISTQ_CACHE": str(distq_cache), "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distq: error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and "Triton kernel masked_grad on cpu (float32) disagrees" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_a_raising_kernel_falls_back_as_a_wrong_one(monkeypatch, triton_on_cpu, capsys):
    monkeypatch.setattr(triton_kernels, "act_quant_forward", raising)
    x = (1.5 * torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(0)) + 0.4).requires_grad_()
    y = act_quant(x, 4, "auto")
    y.backward(torch.ones_like(y))
    want_y, want_mask = eager.act_forward_torch(x.detach(), 4, True)
    assert torch.equal(y.detach(), want_y) and torch.equal(x.grad, want_mask.float())
    (line,) = warnings(capsys.readouterr().err)
    assert line == ("distq: warning: Triton kernel act_quant on cpu (float32) failed (RuntimeError: out of resources: shared memory, "
                    "required: 300000): using the PyTorch kernel for this run")  # fmt: skip
    assert kernel_check.checks_run == ["act_quant", "masked_grad"]  # the real masked_grad passed and ran
    with pytest.raises(DistqError, match=r"^Triton kernel act_quant on cpu \(float32\) failed \(RuntimeError: out of resources"):
        act_quant(x, 4, "triton")  # the same verdict, strict


def test_a_kernel_that_does_not_compile_falls_back(monkeypatch, triton_on_cpu, capsys):
    import triton

    def does_not_compile(*args, **kwargs):
        raise triton.compiler.errors.CompilationError("kernel.py", None, "unsupported ptx version\nat line 3")

    monkeypatch.setattr(triton_kernels, "inside_unit", does_not_compile)
    w = (0.8 * torch.randn(16, 8, generator=torch.Generator().manual_seed(2))).requires_grad_()
    weight_quant(w, 1, False, "auto").sum().backward()
    want = eager.masked_grad_torch(torch.ones_like(w), eager.inside_unit(w.detach()))
    assert torch.equal(w.grad, want)
    (line,) = warnings(capsys.readouterr().err)
    assert line.startswith("distq: warning: Triton kernel inside_unit on cpu (float32) failed (CompilationError:"), line


def test_the_real_kernels_pass_the_check_in_fp32_and_bf16(triton_on_cpu, capsys):
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, 4, 4, dtype=dtype, requires_grad=True)
        act_quant(x, 3, "auto").sum().backward()
        aqe_quant(x, 2, 0.5, True, "auto").sum().backward()
        w = (0.05 * torch.randn(8, 3, 3, 3)).to(dtype).requires_grad_()
        weight_quant(w, 4, True, "auto").sum().backward()
        weight_quant(w, 1, True, "auto").sum().backward()
    assert sorted(kernel_check.checks_run) == sorted(list(kernel_check.CHECKS) * 2)
    assert all(reason is None for reason in kernel_check._verdicts.values()), kernel_check._verdicts
    assert warnings(capsys.readouterr().err) == []


def test_the_check_runs_once_per_process_and_kernel(monkeypatch, triton_on_cpu, capsys):
    calls = []
    real = kernel_check.CHECKS["act_quant"]
    monkeypatch.setitem(kernel_check.CHECKS, "act_quant", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(triton_kernels, "masked_grad", shifted(triton_kernels.masked_grad))
    for bits in (2, 4, 4, 8):
        x = torch.randn(3, 5, requires_grad=True)
        act_quant(x, bits, "auto").sum().backward()
        assert torch.equal(x.grad, eager.act_forward_torch(x.detach(), bits, True)[1].float())
    assert len(calls) == 1
    assert kernel_check.checks_run == ["act_quant", "masked_grad"]
    assert len(warnings(capsys.readouterr().err)) == 1  # masked_grad's, once
    act_quant(torch.randn(3, 5, dtype=torch.bfloat16), 4, "auto")  # another dtype: checked once more
    assert len(calls) == 2


def test_under_torch_compile_the_check_runs_at_the_first_real_call(monkeypatch, triton_on_cpu, capsys):
    monkeypatch.setattr(triton_kernels, "act_quant_forward", shifted(triton_kernels.act_quant_forward))
    torch._dynamo.reset()

    def fn(x):
        return act_quant(x * 2, 4, "auto")

    compiled = torch.compile(fn, backend="aot_eager")
    x = torch.randn(4, 16, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    want = eager.act_forward_torch(x.detach() * 2, 4, True)
    assert torch.equal(y.detach(), want[0]) and torch.equal(x.grad, 2 * want[1].float())
    assert kernel_check.checks_run == ["act_quant", "masked_grad"]
    assert len(warnings(capsys.readouterr().err)) == 1
    torch._dynamo.reset()


# --- the native CPU loops ------------------------------------------------------------------------

needs_native = pytest.mark.skipif(load_native() is None, reason="native kernels unavailable (no C++ compiler)")


@needs_native
def test_a_wrong_native_loop_falls_back_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(native_cpu, "_act_loop", shifted(native_cpu._act_loop, 1.0))
    for _ in range(3):
        x = (1.5 * torch.randn(4, 8, 6, 6) + 0.4).requires_grad_()
        y = act_quant(x, 4, "torch")
        y.backward(torch.ones_like(y))
        want_y, want_mask = eager.act_forward_torch(x.detach(), 4, True)
        assert torch.equal(y.detach(), want_y) and torch.equal(x.grad, want_mask.float())
    assert native_cpu.checks_run == ["act_quant", "masked_grad"]  # once each; the right masked loop ran
    (line,) = warnings(capsys.readouterr().err)
    assert line.startswith("distq: warning: native CPU loop act_quant (") and "disagrees with the PyTorch passes (max |diff| 1" in line
    assert line.endswith(": using the PyTorch passes for this run")
    assert native_cpu.act_forward(x.detach(), 4, True) is None  # the loop is not used again


@needs_native
def test_a_wrong_dorefa_gradient_loop_falls_back_with_one_line(monkeypatch, capsys):
    real = native_cpu._grad_loop
    monkeypatch.setattr(native_cpu, "_grad_loop", lambda *a: real(*a) * 1.0001)
    for per_channel in (False, True):
        w = (0.05 * torch.randn(16, 8, 3, 3)).requires_grad_()
        upstream = torch.randn(w.shape)
        weight_quant(w, 4, per_channel, "torch").backward(upstream)
        with native_cpu.pytorch_passes_only():
            _, t, s = eager.dorefa_forward(w.detach(), 4, per_channel)
        assert torch.equal(w.grad, eager.dorefa_backward_torch(upstream, t, s, per_channel))
    (line,) = warnings(capsys.readouterr().err)
    assert "native CPU loop dorefa_backward (" in line and "disagrees with the PyTorch passes" in line, line
    assert native_cpu.checks_run.count("dorefa_backward") == 1 and native_cpu.checks_run.count("dorefa_forward") == 1


@needs_native
def test_a_raising_native_loop_falls_back_and_the_real_loops_pass(monkeypatch, capsys):
    def broken(*args):
        raise OSError("exception: access violation reading 0x0")

    monkeypatch.setattr(native_cpu, "_masked_loop", broken)
    x = (torch.randn(64) + 0.3).requires_grad_()
    act_quant(x, 4, "torch").backward(torch.ones(64))  # a dense upstream gradient (sum()'s is expanded: no loop takes it)
    assert torch.equal(x.grad, eager.act_forward_torch(x.detach(), 4, True)[1].float())
    w = (0.05 * torch.randn(8, 4)).requires_grad_()
    weight_quant(w, 3, True, "torch").backward(torch.ones(8, 4))
    assert native_cpu._verdicts == {"act_quant": True, "masked_grad": False, "dorefa_forward": True, "dorefa_backward": True}
    (line,) = warnings(capsys.readouterr().err)
    assert "native CPU loop masked_grad (" in line and "failed (OSError: exception: access violation reading 0x0)" in line, line
