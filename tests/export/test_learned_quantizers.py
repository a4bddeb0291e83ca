"""LSQ and PACT (learned quantizer parameters) through every export: the packed file in the
integer engine (torch reference and native kernels), ONNX (QCDQ) in onnxruntime, QONNX.

The digits models are trained here, in process and briefly: a full-precision ResNet-18 (width 8)
once per session, then per case its quantized copy with the method's parameters started from
data (LSQ's steps by the method's own calibration, PACT's clipping levels at the 99th
percentile of each activation's input) and fine-tuned a few steps, so steps and alphas are
learned values, different per layer. The bar is that of test_int_agreement.py and
test_onnx_agreement.py: the fake-quantized model's top-1 class on >= 99.9% of the 355 digits
val images, logits close; in float64 the engine computes every activation integer exactly.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper
from single_thread import one_thread, sgd_steps

from distq.config.schema import ModelConfig, QuantConfig
from distq.export.exporter import export_model
from distq.export.format import from_bytes, to_bytes, unpack_planes
from distq.export.onnx_export import model_to_onnx
from distq.infer.engine import build_engine
from distq.infer.layers import IntAct
from distq.infer.verify import exact_reference
from distq.models.build import build_model
from distq.native.library import load
from distq.quant.calibrate import calibrate
from distq.quant.layers import QAct, quant_layers
from distq.quant.methods import build_method

needs_native = pytest.mark.skipif(load() is None, reason="native kernels unavailable (no C++ compiler)")

WIDTH = 8
PREPROCESS = {"image_size": 32, "val_crop_ratio": 1.0, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def header(image_size=32, width=WIDTH):
    return {
        "model": {"arch": "resnet18", "width": width, "small_input": image_size <= 32, "num_classes": 10},
        "preprocess": {**PREPROCESS, "image_size": image_size},
        "classes": [str(i) for i in range(10)],
    }


def quant_model(method, bits, per_channel=False, small_input=True, width=WIDTH, seed=0):
    torch.manual_seed(seed)
    quant = QuantConfig(w_bits=bits, a_bits=bits, method=method, per_channel=per_channel)
    return build_model(ModelConfig(arch="resnet18", width=width, small_input=small_input), quant, 10)


@torch.no_grad()
def start_learned_parameters(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """LSQ's steps by its own first-batch calibration (the trainer's); PACT's alphas at the 99th
    percentile of each quantized activation's input, set in forward order."""
    model.train()
    calibrate([model], images, lambda t: t)

    def clip_at_percentile(layer, inputs):
        layer.act_clip.fill_(float(torch.quantile(inputs[0].clamp(min=0).flatten()[: 1 << 20], 0.99)))

    hooks = [
        layer.register_forward_pre_hook(clip_at_percentile)
        for _, layer in quant_layers(model)
        if isinstance(layer, QAct) and hasattr(layer, "act_clip")
    ]
    if hooks:
        buffers = [(b, b.clone()) for b in model.buffers()]
        model(images)
        for hook in hooks:
            hook.remove()
        for buffer, saved in buffers:
            buffer.copy_(saved)
    return model.eval()


def learned_parameters(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in ("weight_step", "act_step", "act_clip")]


pytestmark = pytest.mark.usefixtures("single_threaded")


# --- the digits models ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def digits(digits_root):
    """(train images, train labels, val images, val labels) of the digits, as the val transform makes them."""
    from distq.data.folder import image_folder
    from distq.data.transforms import val_transform

    transform = val_transform(32, 1.0)

    def split(name):
        data = image_folder(digits_root, name, transform)
        images, labels = zip(*(data[i] for i in range(len(data))))
        return torch.stack(images), torch.tensor(labels)

    return (*split("train"), *split("val"))


def _train(model: nn.Module, images, labels, steps: int, lr: float, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    with one_thread():
        sgd_steps(model, optimizer, images, labels, steps, generator)
    return model.eval()


@pytest.fixture(scope="session")
def float_weights(digits):
    """The state of a full-precision ResNet-18 (width 8) trained 60 steps on the digits (~80% top-1)."""
    x, y = digits[:2]
    model = _train(quant_model("dorefa", 32), x, y, steps=60, lr=0.05)
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


@pytest.fixture(scope="session")
def learned_model(digits, float_weights):
    """``learned_model(method, bits, per_channel=False)``: the float model quantized, its learned
    quantizer parameters started from data and fine-tuned 30 steps with the weights (cached)."""
    made = {}

    def make(method, bits, per_channel=False):
        key = (method, bits, per_channel)
        if key not in made:
            x, y = digits[:2]
            model = quant_model(method, bits, per_channel)
            model.load_state_dict(float_weights, strict=False)
            start_learned_parameters(model, x[:64])
            started = learned_parameters(model)
            _train(model, x, y, steps=30, lr=0.01)
            learned = learned_parameters(model)
            assert learned and all(not torch.equal(a, b) for a, b in zip(started, learned))  # they did learn
            made[key] = model
        return made[key]

    return make


CASES = [("lsq", 4, False), ("lsq", 2, False), ("pact", 4, False), ("pact", 2, False), ("lsq", 4, True)]
IDS = ["lsq_w4a4", "lsq_w2a2", "pact_w4a4", "pact_w2a2", "lsq_w4a4_per_channel"]


def assert_agrees(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """The same top-1 on >= 99.9% of the images, every image's logits within 10% of the largest
    |logit| and the median image's within float rounding of it (a level flip on a boundary is
    the only difference float32 leaves)."""
    got, ref = got.double(), ref.double()
    agree = (got.argmax(1) == ref.argmax(1)).sum().item()
    gap, scale = (got - ref).abs().amax(1), ref.abs().max().item()
    report = f"{what}: {agree}/{len(ref)} agree, max |logit diff| {gap.max():.3g}, median {gap.median():.3g}, max |logit| {scale:.3g}"
    assert agree >= 0.999 * len(ref), report
    assert gap.max() <= 0.1 * scale and gap.median() <= 1e-4 * scale, report


@pytest.mark.parametrize("method,bits,per_channel", CASES, ids=IDS)
def test_integer_engine_agrees_with_the_fake_quantized_model(learned_model, digits, method, bits, per_channel):
    model = learned_model(method, bits, per_channel)
    x_val = digits[2]
    export = from_bytes(to_bytes(export_model(model, header())[0]))  # the file as written and read
    acts = {n: r for n, r in export.header["layers"].items() if r["op"] == "act" and r["bits"] == bits}
    assert len(acts) == 16
    for name, record in acts.items():  # what the engine rebuilds each activation from
        layer = model.get_submodule(name)
        expected = {"scale": layer.act_step.item()} if method == "lsq" else {"alpha": layer.act_clip.item()}
        assert {k: v for k, v in record.items() if k not in ("op", "bits", "method")} == expected
    with torch.no_grad():
        ref = model(x_val)
        assert (ref.argmax(1) == digits[3]).float().mean() > 0.2  # a trained model (chance: 10%), not a degenerate one
    for kernels in ("reference", "native") if load() is not None else ("reference",):
        engine = build_engine(export, kernels=kernels)
        assert all(m == {"bit": 0, "float": 0} for m in engine.layer_modes().values())
        assert_agrees(engine(x_val), ref, f"{method} w{bits}a{bits} {kernels}")
        assert all(m["bit"] >= 1 and m["float"] == 0 for m in engine.layer_modes().values())  # every layer on bit operations
    # float64: every activation the same integers as the exact fake-quantized model, logits to rounding.
    exact = exact_reference(copy.deepcopy(model))
    engine = build_engine(export, torch.float64)
    seen = {}
    for name, module in engine.net.named_modules():
        if isinstance(module, IntAct):
            module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.as_subclass(torch.Tensor)))
    expected_acts = {}
    for name, module in exact.named_modules():
        if isinstance(module, QAct) and module.bits == bits:
            module.register_forward_hook(lambda m, i, o, name=name: expected_acts.__setitem__(name, o))
    batch = x_val[:64]
    with torch.no_grad():
        want = exact(batch.double())
    got = engine(batch).double()
    assert set(seen) == set(expected_acts)
    assert all(torch.equal(seen[k], v) for k, v in expected_acts.items())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("method,bits,per_channel", CASES, ids=IDS)
def test_onnxruntime_agrees_with_the_fake_quantized_model(learned_model, digits, method, bits, per_channel):
    model = learned_model(method, bits, per_channel)
    x_val = digits[2]
    proto = model_to_onnx(model, header(), "onnx")
    onnx.checker.check_model(proto, full_check=True)
    with torch.no_grad():
        ref = model(x_val)
    assert_agrees(torch.from_numpy(run_onnx(proto, x_val)), ref, f"{method} w{bits}a{bits} onnxruntime")


# --- the stored forms ------------------------------------------------------------------------


def run_onnx(proto: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x.numpy()})[0]


def random_model(method, bits, per_channel=False, small_input=True, negative_bn=False, width=4):
    """A quantized ResNet with random weights, batch-norm statistics like a trained model's and
    its learned parameters started from random images."""
    model = quant_model(method, bits, per_channel, small_input, width)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5 if negative_bn else 0.5, 1.5)
            m.bias.data.uniform_(0.2, 0.6)
    size = 32 if small_input else 61
    return start_learned_parameters(model, torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(5)))


def initializers(proto):
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_weights_are_signed_integers_of_the_full_range_and_the_step(bits, per_channel):
    """Unfolded, DequantizeLinear(int8 integers, step) is the LSQ weight quantizer's output; the Clip
    states [-2^(b-1), 2^(b-1) - 1] (none at 8 bits: int8 itself); activations quantize by the step."""
    model = random_model("lsq", bits, per_channel)
    proto = model_to_onnx(model, header(), "onnx", fold_bn=False)
    inits, nodes = initializers(proto), {n.output[0]: n for n in proto.graph.node}
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for name, layer in quant_layers(model):
        if isinstance(layer, QAct):
            if layer.bits == bits:
                dq = nodes[name]
                q = nodes[dq.input[0]] if bits == 8 else nodes[nodes[dq.input[0]].input[0]]
                assert q.op_type == "QuantizeLinear" and inits[q.input[1]] == np.float32(layer.act_step.item())
            continue
        stored = inits[f"{name}.weight_int8"].astype(np.int64)
        scale = inits[f"{name}.weight_scale"].astype(np.float64)
        assert stored.min() >= low and stored.max() <= high and stored.min() < 0
        dq = nodes[f"{name}.weight"]
        if bits < 8:
            clip = nodes[dq.input[0]]
            assert clip.op_type == "Clip" and (int(inits[clip.input[1]]), int(inits[clip.input[2]])) == (low, high)
        else:
            assert dq.input[0] == f"{name}.weight_int8"
        assert scale.size == (layer.weight.shape[0] if per_channel else 1)
        values = stored * (scale.reshape(-1, 1, 1, 1) if per_channel else scale)
        expected = layer.quantizer.weight(layer, layer.weight, bits).detach().double().numpy()
        np.testing.assert_allclose(values, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", [2, 4])
def test_pact_activation_scale_is_alpha_over_levels(bits):
    model = random_model("pact", bits)
    proto = model_to_onnx(model, header(), "onnx")
    inits, nodes = initializers(proto), {n.output[0]: n for n in proto.graph.node}
    for name, layer in quant_layers(model):
        if isinstance(layer, QAct) and layer.bits == bits:
            clip = nodes[nodes[name].input[0]]
            q = nodes[clip.input[0]]
            levels = (1 << bits) - 1
            assert inits[q.input[1]] == np.float32(torch.tensor(layer.act_clip.item()) / levels)
            assert (int(inits[clip.input[1]]), int(inits[clip.input[2]])) == (0, levels)


@pytest.mark.parametrize("method", ["lsq", "pact"])
def test_negative_batchnorm_factors(method):
    """A negative batch-norm factor folds its sign into the integers; LSQ's -2^(b-1) has no positive
    counterpart, so such a batch-norm stays a BatchNormalization node, and the logits still agree."""
    model = random_model(method, 4, negative_bn=True)
    conv, bn = model.layer1[0].conv1, model.layer1[0].bn1
    with torch.no_grad():  # channel 0: a weight far below the range (LSQ: integer -8), a negative factor
        conv.weight[0, 0, 0, 0] = -10 * conv.weight.abs().max()
        bn.weight[0] = -1.0
    proto = model_to_onnx(model, header(), "onnx")
    kept = {n.name for n in proto.graph.node if n.op_type == "BatchNormalization"}
    assert kept == ({"layer1.0.bn1"} if method == "lsq" else set())
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    got = run_onnx(proto, x)
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert np.median(np.abs(got - ref).max(1)) <= 1e-5 * max(np.abs(ref).max(), 1.0)


@pytest.mark.parametrize("method,bits", [("lsq", 4), ("pact", 2)])
def test_qonnx_passes_qonnx_checks_and_its_executor_matches_onnxruntime(method, bits):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.util.cleanup import cleanup_model

    model = random_model(method, bits, per_channel=method == "lsq")
    proto = model_to_onnx(model, header(), "qonnx")
    onnx.checker.check_model(proto, full_check=True)
    weights = [n for n in proto.graph.node if n.op_type == "Quant" and n.name.endswith(".weight")]
    assert len(weights) == 19
    for node in weights:  # LSQ: the full signed b-bit range; DoReFa (PACT's weights): narrow (b + 1)-bit
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        width = float(initializers(proto)[node.input[3]])
        assert (attrs["signed"], attrs["narrow"], width) == ((1, 0, bits) if method == "lsq" else (1, 1, bits + 1))
    wrapper = cleanup_model(ModelWrapper(proto), override_inpsize=1).transform(InferDataTypes(allow_scaledint_dtypes=True))
    assert wrapper.check_all_tensor_shapes_specified()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    expected = run_onnx(model_to_onnx(model, header(), "onnx"), x)
    name_in, name_out = wrapper.graph.input[0].name, wrapper.graph.output[0].name
    got = np.concatenate([execute_onnx(wrapper, {name_in: x[i : i + 1].numpy()})[name_out] for i in range(len(x))])
    assert (got.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(got, expected, rtol=0, atol=0.05 * np.abs(expected).max())


@pytest.mark.parametrize("method", ["lsq", "pact"])
def test_packed_codes_are_the_methods_and_the_engine_runs_the_imagenet_stem(method):
    """The packed weight codes give back the exported integers through the method's ``integers``;
    with the ImageNet stem (a max-pool of integer activations, pooled natively through the
    activation's own value table), native and reference kernels agree bit for bit and float64
    is exact."""
    model = random_model(method, 2, small_input=False)
    export, _ = export_model(model, header(61, width=4))
    for name, record in export.header["layers"].items():
        if record["op"] == "conv" and record["weight_bits"] == 2:
            layer = model.get_submodule(name)
            codes = unpack_planes(export.tensors[record["tensors"]["weight_codes"]], 2, tuple(record["shape"]))
            assert torch.equal(build_method(record["method"]).integers(codes, 2), layer.quantizer.weight_codes(layer).integers)
    x = torch.randn(2, 3, 61, 61, generator=torch.Generator().manual_seed(3))
    reference = build_engine(export, kernels="reference")(x)
    if load() is not None:
        assert torch.equal(build_engine(export, kernels="native")(x), reference)
    with torch.no_grad():
        want = exact_reference(copy.deepcopy(model))(x.double())
    torch.testing.assert_close(build_engine(export, torch.float64)(x).double(), want, rtol=0, atol=1e-5)
