"""LSQ against PyTorch's own learnable fake quantizer, PACT against the paper's equations in
float64 (acceptance check 1 of the quantizer-objects issue)."""

from __future__ import annotations

import math

import pytest
import torch

from distq.quant.layers import QAct, QConv2d
from distq.quant.methods.lsq import act_range, lsq_quant, weight_range
from distq.quant.methods.pact import pact_quant

BITS = (2, 3, 4, 8)


def torch_lsq(x, step, low, high, grad_factor, per_channel):
    zero = torch.zeros(step.numel(), dtype=torch.float32 if not per_channel else torch.int32)
    if per_channel:
        return torch._fake_quantize_learnable_per_channel_affine(x, step, zero.float(), 0, low, high, grad_factor)
    return torch._fake_quantize_learnable_per_tensor_affine(x, step.reshape(1), zero.float(), low, high, grad_factor)


def run(fn, x, step):
    x = x.clone().requires_grad_(True)
    step = step.clone().requires_grad_(True)
    out = fn(x, step)
    grad = torch.randn_like(out, generator=torch.Generator().manual_seed(3))
    out.backward(grad)
    return out.detach(), x.grad, step.grad


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_equals_torch_learnable_fake_quantize(bits, signed, per_channel):
    gen = torch.Generator().manual_seed(bits * 10 + signed + 2 * per_channel)
    x = torch.randn(6, 5, 3, 3, generator=gen) * 2
    low, high = weight_range(bits) if signed else act_range(bits)
    step = (torch.rand(6 if per_channel else 1, generator=gen) * 0.5 + 0.05) * 4 / high
    if not per_channel:
        step = step.reshape(())
    factor = 1.0 / math.sqrt((x.numel() // step.numel()) * high)
    ours = run(lambda v, s: lsq_quant(v, s, low, high, factor), x, step)
    theirs = run(lambda v, s: torch_lsq(v, s, low, high, factor, per_channel), x, step)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)  # the same float operations
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=0)
    # The step's gradient is a sum: only the summation order differs.
    torch.testing.assert_close(ours[2], theirs[2].reshape(ours[2].shape), rtol=1e-5, atol=1e-6)


def pact_reference(x, alpha, bits, grad):
    """The paper's equations in float64: y = clip(x, 0, alpha), y_q = round(y L / alpha) alpha / L;
    dy_q/dx = 1 on [0, alpha), dy_q/dalpha = 1 where x >= alpha."""
    x, alpha, grad = x.double(), float(alpha), grad.double()
    n = 2**bits - 1
    y = x.clamp(0, alpha)
    out = torch.round(y * n / alpha) * alpha / n
    grad_x = grad * ((x >= 0) & (x < alpha)).double()
    grad_alpha = (grad * (x >= alpha).double()).sum()
    return out, grad_x, grad_alpha


@pytest.mark.parametrize("bits", BITS)
def test_pact_equals_float64_reference(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(4, 8, 5, 5, generator=gen) * 3
    alpha = torch.tensor(2.5)
    out, grad_x, grad_alpha = run(lambda v, a: pact_quant(v, a, bits), x, alpha)
    grad = torch.randn_like(out, generator=torch.Generator().manual_seed(3))
    ref_out, ref_x, ref_alpha = pact_reference(x, alpha, bits, grad)
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_x.double(), ref_x, rtol=0, atol=0)
    torch.testing.assert_close(grad_alpha.double(), ref_alpha, rtol=1e-6, atol=1e-5)


def test_lsq_layers_learn_their_steps_with_the_paper_gradient_scale():
    conv = QConv2d(4, 6, 3, bits=4, method="lsq", per_channel=True)
    act = QAct(bits=4, method="lsq")
    assert conv.weight_step.shape == (6,) and act.act_step.shape == (1,)
    x = torch.randn(2, 4, 5, 5)
    act(conv(x)).sum().backward()
    assert conv.weight_step.grad is not None and act.act_step.grad is not None
    assert torch.count_nonzero(conv.weight_step.grad) > 0


def test_lsq_rescales_its_step_when_the_controller_changes_bits():
    act = QAct(bits=2, method="lsq")
    with torch.no_grad():
        act.act_step.fill_(0.5)
    x = torch.linspace(-1, 4, 101)
    assert torch.equal(act(x), torch.round(x * (1 / torch.tensor(0.5))).clamp(0, 3) * 0.5)  # at its own bits: the paper
    act.bits = 4
    step = 0.5 * math.sqrt(3 / 15)  # the initialisation rule's ratio, sqrt(Q_P(2) / Q_P(4))
    expected = torch.round(x * (1 / torch.tensor(step))).clamp(0, 15) * torch.tensor(step)
    torch.testing.assert_close(act(x), expected, rtol=0, atol=1e-7)


def test_lsq_refuses_one_bit_naming_the_key():
    from distq.config import load_config

    with pytest.raises(Exception, match=r"quant.w_bits=1: method lsq defines weights of 2..8 bits \(or 32\)"):
        load_config(None, ["quant.method=lsq", "quant.w_bits=1", "quant.a_bits=2"])
    with pytest.raises(Exception, match=r"quant.a_bits=1: method pact defines activations of 2..8 bits"):
        load_config(None, ["quant.method=pact", "quant.w_bits=1", "quant.a_bits=1"])
    load_config(None, ["quant.method=pact", "quant.w_bits=1", "quant.a_bits=2"])  # binary DoReFa weights
    with pytest.raises(Exception, match=r"guided student 'student_w1a2' trains at 1 bits, but method lsq defines weights"):
        load_config(None, ["quant.method=lsq", "guided.students=[{w_bits: 1, a_bits: 2}]"])


def test_calibration_sets_the_papers_initial_steps_and_leaves_batchnorm_alone():
    """s = 2 mean|v| / sqrt(Q_P): from the weights (per channel here), and for each activation from
    the ReLU output it receives on the first batch, the layers before it already quantized."""
    from distq.models import build_float_model, quantize_model
    from distq.quant.calibrate import calibrate
    from distq.quant.layers import quant_layers

    torch.manual_seed(0)
    model = quantize_model(build_float_model("resnet18", 10, width=4, small_input=True), 3, 2, method="lsq", per_channel=True).train()
    images = torch.randn(6, 3, 16, 16)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda m, inp, name=name: seen.__setitem__(name, inp[0].clone()))
             for name, layer in quant_layers(model) if isinstance(layer, QAct)]
    # Two ranks with the same batch: sums and counts double, the means do not.
    assert calibrate([model], images, lambda t: 2 * t) == sum(1 for _ in quant_layers(model))
    for h in hooks:
        h.remove()
    for name, layer in quant_layers(model):
        if isinstance(layer, QAct):
            want = 2 * seen[name].double().clamp(min=0).mean() / math.sqrt(3)
            torch.testing.assert_close(layer.act_step.double(), want.reshape(1), rtol=1e-6, atol=0)
        else:
            w = layer.weight.detach().double()
            want = 2 * w.abs().reshape(w.shape[0], -1).mean(dim=1) / math.sqrt(3)  # 3-bit signed: Q_P = 3
            torch.testing.assert_close(layer.weight_step.double(), want, rtol=1e-6, atol=0)
    for key, value in buffers.items():
        if "step" not in key:
            assert torch.equal(model.state_dict()[key], value), key


def test_pretrained_weights_move_between_methods_without_their_learned_parameters(tmp_path):
    """model.pretrained takes weights and batch-norm statistics only: an LSQ run's steps do not
    reach a DoReFa model, and an LSQ model started from float weights keeps its own steps."""
    from distq.models import build_float_model, quantize_model
    from distq.models.build import load_float_weights

    def model(method):
        torch.manual_seed(1)
        return quantize_model(build_float_model("resnet18", 10, width=4, small_input=True), 4, 4, method=method)

    lsq = model("lsq")
    torch.save(lsq.state_dict(), tmp_path / "lsq.pt")
    dorefa = model("dorefa")
    load_float_weights(dorefa, str(tmp_path / "lsq.pt"))
    assert torch.equal(dorefa.layer1[0].conv1.weight, lsq.layer1[0].conv1.weight)

    torch.save(model("dorefa").state_dict(), tmp_path / "dorefa.pt")
    target = model("lsq")
    with torch.no_grad():
        target.layer1[0].conv1.weight_step.fill_(0.25)
    load_float_weights(target, str(tmp_path / "dorefa.pt"))
    assert float(target.layer1[0].conv1.weight_step.detach()) == 0.25
