"""``--format onnx-int``: quantized convs and linears as integer matrix products in onnxruntime.

The proof is the runtime's own: its profiler lists the kernels it executed, and every quantized
conv/linear must be one of its integer kernels (MatMulInteger, or MatMulIntegerToFloat, the
fusion of MatMulInteger with its float epilogue), with float kernels only for the
full-precision first conv and last linear. The outputs are the integer engine's: the same codes,
the same integer accumulators, only the float32 epilogue rounding (the engine's is float64)
may move a pre-activation that sits on a quantization boundary. Random-weight models check
every precision and method quickly; trained digits models (slow) check the accuracy bar on
the 355 val images.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import test_learned_quantizers as learned
import torch
import torch.nn as nn
from test_learned_quantizers import _train, quant_model, random_model, start_learned_parameters
from test_learned_quantizers import header as digits_header
from test_onnx_export import CLASSES, PREPROCESS, images
from test_onnx_export import make_model as random_resnet

from distq.cli import main
from distq.export.exporter import export_model
from distq.export.format import ExportError, from_bytes, to_bytes
from distq.export.onnx_export import model_to_onnx, summary_lines
from distq.export.onnx_int import INTEGER_OPS
from distq.infer.engine import build_engine
from distq.quant.functional import FULL_PRECISION
from distq.quant.layers import QConv2d, QLinear

# The digits and the full-precision digits model (session fixtures of test_learned_quantizers.py).
digits, float_weights = learned.digits, learned.float_weights
pytestmark = pytest.mark.usefixtures("single_threaded")

FLOAT_KERNELS = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}


def header(arch="resnet18", width=4):
    """The export header: what ONNX needs and what the integer engine rebuilds the model from."""
    return {
        "model": {"arch": arch, "width": width, "small_input": True, "num_classes": len(CLASSES)},
        "preprocess": PREPROCESS,
        "classes": CLASSES,
    }


def session(proto: onnx.ModelProto, profile_prefix: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(proto: onnx.ModelProto, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session(proto).run(None, {"images": x.numpy()})[0])


def engine_logits(model: nn.Module, head: dict, x: torch.Tensor) -> torch.Tensor:
    return build_engine(from_bytes(to_bytes(export_model(model, head)[0])))(x)


def layer_kinds(model: nn.Module) -> tuple[list[str], list[str]]:
    """(quantized conv/linear layers, full-precision ones)."""
    quantized, full = [], []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            is_quantized = isinstance(m, (QConv2d, QLinear)) and m.bits != FULL_PRECISION
            (quantized if is_quantized else full).append(name)
    return quantized, full


def assert_same_as_engine(got: torch.Tensor, engine: torch.Tensor) -> None:
    """The integer engine's logits: same top-1 everywhere, to float rounding for the median image."""
    gap = (got.double() - engine.double()).abs().amax(1)
    scale = engine.abs().max().item()
    assert torch.equal(got.argmax(1), engine.argmax(1)), (got.argmax(1), engine.argmax(1))
    assert gap.median() <= 1e-5 * max(scale, 1.0) and gap.max() <= 0.05 * scale, (gap, scale)


# --- the runtime's proof ----------------------------------------------------------------------


def test_every_quantized_layer_runs_as_an_integer_kernel_in_the_profile(tmp_path):
    """onnxruntime's profiler: each quantized conv/linear of a W4A4 ResNet-18 (digits size) ran
    as an integer kernel, and float Conv/Gemm kernels ran only for the full-precision layers."""
    model = random_resnet(4, 4)
    quantized, full = layer_kinds(model)
    assert len(quantized) == 19 and full == ["conv1", "fc"]
    sess = session(model_to_onnx(model, header(), "onnx-int"), str(tmp_path / "ort"))
    sess.run(None, {"images": images(4).numpy()})
    events = json.loads(open(sess.end_profiling()).read())
    executed = {
        e["name"].removesuffix("_kernel_time"): e["args"]["op_name"]
        for e in events
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
    }
    integer = {node: op for node, op in executed.items() if op in INTEGER_OPS}
    floats = {node: op for node, op in executed.items() if op in FLOAT_KERNELS}
    assert sorted(integer) == sorted(quantized), executed  # the nodes keep the layers' names
    assert set(integer.values()) == {"MatMulIntegerToFloat"}  # onnxruntime fused each epilogue into the integer GEMM
    assert len(floats) == len(full), floats


# --- every precision: the integer engine's outputs --------------------------------------------

CASES = {
    "w1a1": ("dorefa", 1, False),
    "w1a1_per_channel": ("dorefa", 1, True),
    "w2a2": ("dorefa", 2, False),
    "w3a3": ("dorefa", 3, False),
    "w4a4": ("dorefa", 4, False),
    "w4a4_per_channel": ("dorefa", 4, True),
    "w8a8": ("dorefa", 8, False),
    "lsq_w2a2": ("lsq", 2, False),
    "lsq_w4a4_per_channel": ("lsq", 4, True),
    "lsq_w8a8": ("lsq", 8, False),
    "pact_w4a4": ("pact", 4, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_onnxruntime_computes_the_integer_engine(case):
    """Negative batch-norm factors included (their sign stays in the float scale); LSQ/PACT with
    their learned parameters started from data. Also the fake-quantized model's top-1."""
    method, bits, per_channel = CASES[case]
    if method == "dorefa":
        model = random_resnet(bits, bits, per_channel=per_channel)
    else:
        model = random_model(method, bits, per_channel, negative_bn=True)
    proto = model_to_onnx(model, header(), "onnx-int")
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} == {""}  # standard ONNX only
    x = images()
    got = run(proto, x)
    assert_same_as_engine(got, engine_logits(model, header(), x))
    with torch.no_grad():
        assert torch.equal(got.argmax(1), model(x).argmax(1))


def test_eight_bit_dorefa_weights_are_halves_of_the_odd_integers_plus_an_input_sum_column():
    model = random_resnet(8, 8)
    proto = model_to_onnx(model, header(), "onnx-int")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    layer = model.layer1[0].conv1
    n = layer.quantizer.weight_codes(layer).integers.numpy()  # odd, in [-255, 255]
    stored = inits["layer1.0.conv1.weight_int8"]
    assert stored.dtype == np.int8 and stored.shape == (9 * n.shape[1], n.shape[0] + 1)
    np.testing.assert_array_equal(2 * stored[:, :-1].astype(np.int64) + 1, n.transpose(2, 3, 1, 0).reshape(-1, n.shape[0]))
    assert (stored[:, -1] == 1).all()
    assert any(node.name == "layer1.0.conv1.input_sum" for node in proto.graph.node)


@pytest.mark.slow  # an AlexNet: seconds of export
def test_a_quantized_linear_with_float_input_is_qcdq_and_said_so():
    """AlexNet's first classifier linear reads the full-precision features: QCDQ (float Gemm),
    named in the summary; its second reads a quantized activation: integer."""
    model = random_resnet(4, 4, arch="alexnet")
    head = {**header("alexnet", 64)}
    proto = model_to_onnx(model, head, "onnx-int")
    lines = summary_lines(proto, "m.onnx", 1, "onnx-int")
    assert lines[1] == "  5 quantized conv/linear layer(s) as integer matrix products (MatMulInteger)"
    assert lines[2:] == ["  layer 'classifier.1' in the QCDQ form (float kernels): its input is not a quantized activation"]
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["distq"])
    assert meta["format"] == "onnx-int" and "classifier.4" in meta["integer"]["integer_layers"]
    x = images(4)
    assert_same_as_engine(run(proto, x), engine_logits(model, head, x))


def test_imagenet_stem_pools_floats_before_quantizing():
    """The 224-style stem: conv, activation, max pool. The pool runs on floats (max commutes with
    the quantizer; onnxruntime's uint8 MaxPool is ~20x slower) and the result is still the engine's."""
    torch.manual_seed(0)
    model = copy.deepcopy(random_resnet(4, 4))
    model.conv1 = nn.Conv2d(3, 4, 3, 2, 1, bias=False)
    model.maxpool = nn.MaxPool2d(3, 2, 1)
    model.eval()
    proto = model_to_onnx(model, {**header(), "preprocess": {**PREPROCESS, "image_size": 32}}, "onnx-int")
    pool = next(n for n in proto.graph.node if n.op_type == "MaxPool")
    produced = {n.output[0]: n for n in proto.graph.node}
    assert produced[pool.input[0]].op_type == "Conv"  # the float conv's output, not codes
    x = images(4)
    with torch.no_grad():
        assert torch.equal(run(proto, x).argmax(1), model(x).argmax(1))


def test_what_has_no_integer_form_is_one_line_naming_the_layer():
    with pytest.raises(ExportError, match=r"^cannot export layer 'relu' to ONNX: its 2-bit AQE activation"):
        model_to_onnx(random_resnet(2, 2, method="aqe"), header(), "onnx-int")
    with pytest.raises(ExportError, match=r"^--no-fold-bn does not apply to --format onnx-int"):
        model_to_onnx(random_resnet(4, 4), header(), "onnx-int", fold_bn=False)


# --- the command line ----------------------------------------------------------------------------


def test_export_onnx_int_and_eval_it_with_the_onnx_engine(tiny_run, tmp_path, capsys):
    out = tmp_path / "tiny.int.onnx"
    assert main(["export", str(tiny_run), "--format", "onnx-int", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"exported {out}: ") and "onnx-int (opset 13)" in lines[0] and "MatMulInteger" in lines[0]
    assert lines[1] == "  19 quantized conv/linear layer(s) as integer matrix products (MatMulInteger)"
    packed = tmp_path / "tiny.safetensors"
    assert main(["export", str(tiny_run), "--out", str(packed)]) == 0
    assert main(["eval", "--engine", "int", str(packed)]) == 0
    int_engine = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert main(["eval", "--engine", "onnx", str(out)]) == 0
    got = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert got["engine"] == "onnx" and got["images"] == 355
    assert abs(got["val/top1"] - int_engine["val/top1"]) <= 100 / 355 + 1e-9  # at most one image apart


# --- trained digits models: the accuracy bar --------------------------------------------------


@pytest.fixture(scope="module")
def trained(digits, float_weights):
    """``trained(method, bits, steps, lr)``: the full-precision digits model quantized, its learned
    parameters (if any) started from data, fine-tuned ``steps`` steps."""
    made = {}

    def make(method, bits, steps, lr):
        key = (method, bits, steps, lr)
        if key not in made:
            x, y = digits[:2]
            model = quant_model(method, bits)
            model.load_state_dict(float_weights, strict=False)
            start_learned_parameters(model, x[:64])
            made[key] = _train(model, x, y, steps=steps, lr=lr)
        return made[key]

    return make


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,bits,steps,lr",
    [("dorefa", 4, 100, 0.02), ("dorefa", 2, 100, 0.02), ("lsq", 4, 30, 0.01), ("lsq", 2, 30, 0.01)],
    ids=["dorefa_w4a4", "dorefa_w2a2", "lsq_w4a4", "lsq_w2a2"],
)
def test_trained_digits_model_agrees_with_fake_quant_and_the_integer_engine(trained, digits, method, bits, steps, lr):
    """DoReFa from the float model needs 100 steps at 2 bits (30 leave it near chance, its logits tied)."""
    model = trained(method, bits, steps, lr)
    x_val, y_val = digits[2:]
    got = run(model_to_onnx(model, digits_header(), "onnx-int"), x_val)
    engine = engine_logits(model, digits_header(), x_val)
    with torch.no_grad():
        ref = model(x_val)
    n = len(x_val)
    vs_fake = (got.argmax(1) == ref.argmax(1)).sum().item()
    vs_engine = (got.argmax(1) == engine.argmax(1)).sum().item()
    top1 = (got.argmax(1) == y_val).float().mean().item()
    print(f"onnx-int {method} w{bits}a{bits}: top-1 {top1:.3f}, agrees with fake-quant on {vs_fake}/{n}, with the engine on {vs_engine}/{n}")
    assert n == 355 and top1 > 0.6  # a trained model (chance: 10%)
    assert vs_fake >= 0.999 * n and vs_engine == n
