"""Quantized layers: precision is runtime state, travels in state_dict, never rebuilds anything."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from distq.quant.functional import act_quant, aqe_quant, weight_quant
from distq.quant.layers import QAct, QConv2d, QLinear, QuantState, quant_layers


def make_conv(bits: int = 32, **kw) -> QConv2d:
    return QConv2d(3, 8, 3, padding=1, bias=True, bits=bits, **kw)


def make_linear(bits: int = 32, **kw) -> QLinear:
    return QLinear(12, 5, bits=bits, **kw)


LAYERS = {
    "conv": (make_conv, lambda: torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))),
    "linear": (make_linear, lambda: torch.randn(4, 12, generator=torch.Generator().manual_seed(0))),
}


def float_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, QConv2d):
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding)
    return F.linear(x, weight, layer.bias)


def copy_params(dst: nn.Module, src: nn.Module) -> None:
    with torch.no_grad():
        for d, s in zip(dst.parameters(), src.parameters()):
            d.copy_(s)


@pytest.fixture(params=sorted(LAYERS))
def kind(request):
    return request.param


def test_forward_uses_the_quantized_weight(kind):
    build, inputs = LAYERS[kind]
    torch.manual_seed(0)
    layer, x = build(bits=3), inputs()
    assert torch.equal(layer(x), float_forward(layer, x, weight_quant(layer.weight, 3)))
    aqe = build(bits=3, method="aqe")
    copy_params(aqe, layer)
    aqe.alpha = 0.7
    assert torch.equal(aqe(x), float_forward(aqe, x, aqe_quant(layer.weight, 3, 0.7)))
    per_channel = build(bits=3, per_channel=True)
    copy_params(per_channel, layer)
    assert torch.equal(per_channel(x), float_forward(layer, x, weight_quant(layer.weight, 3, per_channel=True)))


@pytest.mark.parametrize("old,new", [(4, 2), (32, 4), (4, 32), (2, 1), (8, 3)])
def test_bits_changed_at_runtime_take_effect_on_next_forward(kind, old, new):
    build, inputs = LAYERS[kind]
    torch.manual_seed(0)
    layer, x = build(bits=old), inputs()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    params_before = list(layer.parameters())
    before = layer(x)

    layer.set_bits(new)
    after = layer(x)

    fresh = build(bits=new)
    copy_params(fresh, layer)
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh(x))
    # Nothing was rebuilt: the optimizer made before the change still trains these tensors.
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert all(a is b for a, b in zip(list(layer.parameters()), params_before))
    assert len(in_optimizer) == len(params_before) and all(a is b for a, b in zip(in_optimizer, params_before))
    weight_before = layer.weight.detach().clone()
    after.square().sum().backward()
    optimizer.step()
    assert not torch.equal(layer.weight, weight_before)


def test_set_bits_validates(kind):
    layer = LAYERS[kind][0](bits=4)
    with pytest.raises(ValueError, match="valid bit-width"):
        layer.set_bits(9)
    assert layer.bits == 4


def test_constructor_validates():
    with pytest.raises(ValueError, match="valid bit-width"):
        make_conv(bits=0)
    with pytest.raises(ValueError, match="unknown"):
        make_linear(bits=4, method="nope")
    with pytest.raises(ValueError, match="valid bit-width"):
        QAct(bits=16)


def test_quantize_false_runs_full_precision_and_keeps_bits(kind):
    build, inputs = LAYERS[kind]
    torch.manual_seed(0)
    layer, x = build(bits=2), inputs()
    quantized = layer(x)
    layer.quantize = False
    assert layer.bits == 2 and layer.effective_bits == 32
    assert torch.equal(layer(x), float_forward(layer, x, layer.weight))
    layer.quantize = True
    assert torch.equal(layer(x), quantized)


def test_qact_quantize_false_is_relu():
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1)) * 2
    act = QAct(bits=2)
    assert torch.equal(act(x), act_quant(x, 2))
    act.quantize = False
    assert torch.equal(act(x), F.relu(x))


def test_qact_at_32_bits_equals_relu():
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(2)) * 3
    for method in ("dorefa", "aqe"):
        assert torch.equal(QAct(32, method)(x), nn.ReLU()(x))
    x.requires_grad_(True)
    QAct(32)(x).sum().backward()
    assert torch.equal(x.grad, (x > 0).float())


def test_qact_methods():
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(QAct(3)(x), act_quant(x, 3))
    aqe = QAct(2, "aqe")
    aqe.alpha = 0.8
    assert torch.equal(aqe(x), aqe_quant(x, 2, 0.8, per_sample=True))
    assert not torch.equal(aqe(x), aqe_quant(x, 2, 0.8, per_sample=False))  # the per-sample threshold matters


@pytest.mark.parametrize(
    "build",
    [lambda **kw: make_conv(**kw), lambda **kw: make_linear(**kw), lambda **kw: QAct(**kw)],
    ids=["conv", "linear", "act"],
)
def test_state_dict_round_trip_restores_precision(build):
    torch.manual_seed(0)
    saved = build(bits=3, method="aqe")
    saved.alpha = 0.75
    state = saved.state_dict()
    assert state["_extra_state"] == {"bits": 3, "method": "aqe", "alpha": 0.75}
    # Checkpoints are read with weights_only=True: the extra state must survive that.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    with pytest.raises(ValueError, match="saved layer uses quantizer method 'aqe', this model 'dorefa'"):
        build(bits=32, method="dorefa").load_state_dict(state)
    loaded = build(bits=32, method="aqe")
    assert (loaded.bits, loaded.method, loaded.alpha) == (32, "aqe", 0.5)
    loaded.load_state_dict(state)
    assert (loaded.bits, loaded.method, loaded.alpha) == (3, "aqe", 0.75)
    for (name, a), (_, b) in zip(saved.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, name


def test_state_dict_rejects_bad_bits():
    state = make_conv(bits=4).state_dict()
    state["_extra_state"] = {"bits": 12, "method": "dorefa", "alpha": 0.5}
    with pytest.raises(ValueError, match="valid bit-width"):
        make_conv().load_state_dict(state)


def test_parameter_names_are_torchvisions():
    assert list(make_conv(bits=4).state_dict()) == [*nn.Conv2d(3, 8, 3).state_dict(), "_extra_state"]
    assert list(make_linear(bits=4).state_dict()) == [*nn.Linear(12, 5).state_dict(), "_extra_state"]


@pytest.mark.parametrize("float_cls,q_cls,args", [(nn.Conv2d, QConv2d, (3, 8, 3)), (nn.Linear, QLinear, (12, 5))])
def test_from_float_shares_parameters(float_cls, q_cls, args):
    module = float_cls(*args)
    q = q_cls.from_float(module, bits=4, method="aqe", per_channel=True)
    assert type(q) is q_cls
    assert q.weight is module.weight and q.bias is module.bias
    assert (q.bits, q.method, q.alpha, q.per_channel, q.quantize) == (4, "aqe", 0.5, True, True)
    q.set_bits(32)
    x = torch.randn(2, 3, 5, 5) if float_cls is nn.Conv2d else torch.randn(2, 12)
    assert torch.equal(q(x), module(x))


def test_quant_layers_lists_quantized_layers_in_order():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), make_conv(), QAct(4), nn.ReLU(), make_linear(), nn.Linear(5, 2))
    found = list(quant_layers(model))
    assert [name for name, _ in found] == ["1", "2", "4"]
    assert all(isinstance(layer, QuantState) for _, layer in found)
