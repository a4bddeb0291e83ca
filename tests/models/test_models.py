"""Quantized torchvision models: training works, torchvision weights load, FP equals torchvision."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from distq.checkpoint import CheckpointError
from distq.config.schema import ModelConfig, QuantConfig
from distq.models import build_float_model, model_names, quantize_model
from distq.models.build import build_model, load_float_weights
from distq.quant.layers import QAct, QConv2d, QLinear, quant_layers

ARCHS = ["resnet18", "resnet34", "resnet50", "alexnet"]
# The layers docs/methods.md keeps full precision: first conv, last linear, activation before pooling.
KEPT_FP = {
    "resnet18": ("conv1", "fc", "layer4.1.act_out"),
    "resnet34": ("conv1", "fc", "layer4.2.act_out"),
    "resnet50": ("conv1", "fc", "layer4.2.act_out"),
    "alexnet": ("features.0", "classifier.6", "features.11"),
}


def images(n: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def record_shape(seen: dict, key: str):
    def hook(module, inputs, output):
        seen[key] = tuple(output.shape)

    return hook


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared machine, OpenMP spin-waits of a second thread
    cost more CPU than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=ARCHS)
def torchvision_weights(request, tmp_path_factory):
    """(arch, torchvision model, path of its state_dict saved with torch.save)."""
    arch = request.param
    torch.manual_seed(1)
    reference = getattr(torchvision.models, arch)(weights=None)
    path = tmp_path_factory.mktemp(arch) / f"{arch}.pth"
    torch.save(reference.state_dict(), path)
    yield arch, reference, path
    path.unlink()


def test_registry_names():
    assert model_names() == sorted(ARCHS)
    with pytest.raises(KeyError):
        build_float_model("vgg16", 10)


def test_w4a4_forward_backward_with_torchvision_weights(torchvision_weights):
    arch, reference, path = torchvision_weights
    model = build_model(ModelConfig(arch=arch, pretrained=str(path)), QuantConfig(w_bits=4, a_bits=4), num_classes=1000)

    state = model.state_dict()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(state[name], tensor), name
    layers = dict(quant_layers(model))
    assert layers and all(layer.bits == 4 for layer in layers.values())

    model.train()
    logits = model(images())
    assert logits.shape == (2, 1000)
    logits.logsumexp(dim=1).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert any(param.grad.abs().sum() > 0 for param in model.parameters())


def test_full_precision_equals_torchvision(torchvision_weights):
    arch, reference, path = torchvision_weights
    model = build_model(ModelConfig(arch=arch), QuantConfig(w_bits=32, a_bits=32), num_classes=1000)
    load_float_weights(model, str(path))
    assert len(list(quant_layers(model))) > 0  # quantized classes, running at 32 bits
    model.eval()
    reference.eval()
    x = images(seed=1)
    with torch.inference_mode():
        assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_first_conv_last_linear_final_act_stay_float(arch):
    model = quantize_model(build_float_model(arch, 10), 4, 4)
    first, last, final_act = (model.get_submodule(name) for name in KEPT_FP[arch])
    assert type(first) is nn.Conv2d
    assert type(last) is nn.Linear
    assert type(final_act) is nn.ReLU
    kept = set(KEPT_FP[arch])
    for name, module in model.named_modules():
        if name in kept:
            continue
        assert type(module) not in (nn.Conv2d, nn.Linear, nn.ReLU), f"{name} was not quantized"
        if isinstance(module, (QConv2d, QLinear, QAct)):
            assert module.bits == 4, name

    everything = quantize_model(
        build_float_model(arch, 10), 4, 3, keep_first_fp=False, keep_last_fp=False, keep_final_act_fp=False
    )
    first, last, final_act = (everything.get_submodule(name) for name in KEPT_FP[arch])
    assert (type(first), type(last), type(final_act)) == (QConv2d, QLinear, QAct)
    assert (first.bits, last.bits, final_act.bits) == (4, 4, 3)


def test_runtime_bits_change_on_a_model_keeps_optimizer_params():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", width=4, small_input=True), QuantConfig(w_bits=4, a_bits=4), 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    params = list(model.parameters())
    model.eval()
    x = images(size=32)
    before = model(x)
    for _, layer in quant_layers(model):
        layer.set_bits(2)
    after = model(x)
    fresh = build_model(ModelConfig(arch="resnet18", width=4, small_input=True), QuantConfig(w_bits=2, a_bits=2), 10)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}, strict=False)
    fresh.eval()
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh(x))
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], params))
    # The bits travel with the model's state_dict.
    reloaded = build_model(ModelConfig(arch="resnet18", width=4, small_input=True), QuantConfig(w_bits=4, a_bits=4), 10)
    reloaded.load_state_dict(model.state_dict())
    assert {layer.bits for _, layer in quant_layers(reloaded)} == {2}


@pytest.mark.parametrize(
    "arch,width,channels",
    [("resnet18", 16, 128), ("resnet34", 8, 64), ("resnet50", 8, 256)],
)
def test_small_input_stem_and_width(arch, width, channels):
    model = build_model(ModelConfig(arch=arch, width=width, small_input=True), QuantConfig(w_bits=4, a_bits=4), 10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.out_channels == width
    assert isinstance(model.maxpool, nn.Identity)
    assert model.layer1[0].conv1.in_channels == width
    assert model.fc.in_features == channels
    seen = {}
    model.layer1.register_forward_hook(record_shape(seen, "layer1"))
    model.layer4.register_forward_hook(record_shape(seen, "layer4"))
    model.eval()
    with torch.inference_mode():
        out = model(images(size=32))
    assert out.shape == (2, 10)
    expansion = 4 if arch == "resnet50" else 1
    assert seen["layer1"] == (2, width * expansion, 32, 32)  # no stride in the small stem
    assert seen["layer4"] == (2, channels, 4, 4)


def test_imagenet_stem_at_width():
    model = build_float_model("resnet18", 10, width=8)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    seen = {}
    model.layer1.register_forward_hook(record_shape(seen, "layer1"))
    with torch.inference_mode():
        assert model.eval()(images(size=64)).shape == (2, 10)
    assert seen["layer1"] == (2, 8, 16, 16)


def test_alexnet_small_input():
    model = build_model(ModelConfig(arch="alexnet", small_input=True), QuantConfig(w_bits=4, a_bits=4), 10)
    first = model.features[0]
    assert type(first) is nn.Conv2d and first.kernel_size == (3, 3) and first.stride == (1, 1)
    assert isinstance(model.features[2], nn.Identity)
    with torch.inference_mode():
        assert model.eval()(images(size=32)).shape == (2, 10)
    with pytest.raises(ValueError, match="width"):
        build_float_model("alexnet", 10, width=32)


def test_float_weights_of_another_model_are_refused(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    model = build_model(ModelConfig(arch="resnet18", width=8), QuantConfig(w_bits=4, a_bits=4), 10)
    with pytest.raises(CheckpointError, match="shape mismatch at conv1.weight"):
        load_float_weights(model, str(path))
    with pytest.raises(CheckpointError, match="not found"):
        load_float_weights(model, str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(CheckpointError, match="not a readable state_dict"):
        load_float_weights(model, str(tmp_path / "junk.pth"))


def test_an_unknown_architecture_is_refused_by_the_registry():
    from distq.config import ConfigError

    with pytest.raises(ConfigError, match=r"^model\.arch='vgg16' is unknown: use one of alexnet, resnet18, resnet34, resnet50$"):
        build_model(ModelConfig(arch="vgg16"), QuantConfig(), 10)
