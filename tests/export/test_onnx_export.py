"""ONNX (QCDQ) and QONNX export of small random-weight models: the graph is standard and checked,
onnxruntime computes the fake-quantized PyTorch model's logits, the stored integers are the
training quantizer's, QONNX passes qonnx's own passes and its executor matches onnxruntime.

Random weights put some pre-activations within float rounding of a quantization boundary,
where onnxruntime and PyTorch (different summation orders) may pick neighbouring levels; so
the logits are compared image by image: most images must agree to float precision, and
every image's top-1 class must agree. A wrong scale, bias or rounding moves every image.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

from distq.config.schema import ModelConfig, QuantConfig
from distq.export.format import ExportError
from distq.export.onnx_export import model_to_onnx
from distq.export.onnx_format import OPSET
from distq.models.build import build_model
from distq.quant.functional import weight_quant
from distq.quant.layers import QAct, quant_layers

CLASSES = [f"c{i}" for i in range(10)]
PREPROCESS = {"image_size": 32, "val_crop_ratio": 1.0, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def make_model(w_bits, a_bits, arch="resnet18", per_channel=False, method="dorefa", seed=0):
    torch.manual_seed(seed)
    model = build_model(
        ModelConfig(arch=arch, width=64 if arch == "alexnet" else 4, small_input=True),
        QuantConfig(w_bits=w_bits, a_bits=a_bits, per_channel=per_channel, method=method),
        len(CLASSES),
    )
    for m in model.modules():  # batch-norm statistics of a trained model, not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)  # negative factors too: their sign folds into the integers
            m.bias.data.uniform_(0.2, 0.6)
    return model.eval()


def header(arch="resnet18"):
    return {"model": {"arch": arch, "num_classes": len(CLASSES)}, "preprocess": PREPROCESS, "classes": CLASSES}


def images(n=8, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def run_onnx(proto: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x.numpy()})[0]


def assert_same_logits(got: np.ndarray, model: nn.Module, x: torch.Tensor, typical: float = 1e-5) -> None:
    """Same top-1 everywhere, every image within 5% of the largest logit, and the median
    image within ``typical`` of it (float rounding only; at 8 bits, whose levels are 1/255
    apart, most images have a level flip somewhere, so 8-bit cases pass 2e-3)."""
    with torch.no_grad():
        ref = model(x).numpy()
    gap = np.abs(got - ref).max(1)
    scale = np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).all(), (got.argmax(1), ref.argmax(1))
    assert np.median(gap) <= typical * max(scale, 1.0), (gap, scale)
    assert gap.max() <= 0.05 * scale, (gap, scale)


CASES = {
    "fp": (32, 32, False),
    "w1a1": (1, 1, False),
    "w1a1_per_channel": (1, 1, True),
    "w2a2": (2, 2, False),
    "w4a4": (4, 4, False),
    "w4a4_per_channel": (4, 4, True),
    "w8a8": (8, 8, False),
    "w2a32": (2, 32, False),
}


@pytest.mark.parametrize("fold_bn", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("case", list(CASES))
def test_onnxruntime_computes_the_fake_quantized_resnet(case, fold_bn):
    w_bits, a_bits, per_channel = CASES[case]
    model = make_model(w_bits, a_bits, per_channel=per_channel)
    proto = model_to_onnx(model, header(), "onnx", fold_bn=fold_bn)
    onnx.checker.check_model(proto, full_check=True)
    x = images()
    assert_same_logits(run_onnx(proto, x), model, x, typical=2e-3 if a_bits == 8 else 1e-5)


def test_alexnet_layers_pools_and_float_input_linear():
    model = make_model(4, 4, arch="alexnet")
    proto = model_to_onnx(model, header("alexnet"), "onnx")
    ops = {n.op_type for n in proto.graph.node}
    assert {"MaxPool", "AveragePool", "Gemm", "Flatten", "Conv", "QuantizeLinear"} <= ops  # 7x7 -> 6x6 adaptive pool
    x = images(4)
    assert_same_logits(run_onnx(proto, x), model, x)


def initializers(proto):
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def attribute(node, name):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_activations_are_quantize_clip_dequantize_on_uint8(bits):
    model = make_model(bits, bits)
    proto = model_to_onnx(model, header(), "onnx")
    inits = initializers(proto)
    quantized_acts = [n for n, m in model.named_modules() if isinstance(m, QAct) and m.bits == bits]
    produced = {n.output[0]: n for n in proto.graph.node}
    for name in quantized_acts:
        dq = produced[name]
        clip = produced[dq.input[0]]
        q = produced[clip.input[0]]
        assert (q.op_type, clip.op_type, dq.op_type) == ("QuantizeLinear", "Clip", "DequantizeLinear")
        assert inits[q.input[2]].dtype == np.uint8 and inits[q.input[1]] == np.float32(1 / (2**bits - 1))
        assert (int(inits[clip.input[1]]), int(inits[clip.input[2]])) == (0, 2**bits - 1)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_stored_integers_times_scales_are_the_training_quantizers_weights(bits, per_channel):
    """Unfolded, DequantizeLinear(int8 weight) is exactly the quantizer's output, per-tensor or
    per-channel as trained; int8 holds the integers in the k-bit range the Clip states."""
    model = make_model(bits, bits, per_channel=per_channel)
    proto = model_to_onnx(model, header(), "onnx", fold_bn=False)
    inits = initializers(proto)
    nodes = {n.output[0]: n for n in proto.graph.node}
    for name, layer in quant_layers(model):
        if isinstance(layer, QAct):
            continue
        stored = inits[f"{name}.weight_int8"]
        scale = inits[f"{name}.weight_scale"].astype(np.float64)
        assert stored.dtype == np.int8
        dq = nodes[f"{name}.weight"]
        assert dq.op_type == "DequantizeLinear"
        if bits == 8:  # odd integers of [-255, 255]: (n - 1) / 2 in int8, then + scale
            values = stored * scale + inits[f"{name}.weight_offset"].reshape(-1)[0]
        else:
            clip = nodes[dq.input[0]]
            limit = 2**bits - 1
            assert (int(inits[clip.input[1]]), int(inits[clip.input[2]])) == (-limit, limit)
            assert np.abs(stored).max() <= limit
            values = stored * scale.reshape((-1,) + (1,) * (stored.ndim - 1)) if scale.ndim else stored * scale
        expected = weight_quant(layer.weight.detach(), bits, per_channel).double().numpy()
        assert scale.size == (layer.weight.shape[0] if bits == 1 and per_channel else 1)
        np.testing.assert_allclose(values, expected, rtol=0, atol=1e-6)


def test_batchnorm_folds_into_per_channel_scales_and_a_bias_add():
    model = make_model(2, 2)
    folded = model_to_onnx(model, header(), "onnx")
    unfolded = model_to_onnx(model, header(), "onnx", fold_bn=False)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(n.op_type == "BatchNormalization" for n in unfolded.graph.node) == bns
    scale = initializers(folded)["layer1.0.conv1.weight_scale"]
    assert scale.shape == (4,) and (scale > 0).all()  # |g| per channel; the signs went into the integers
    # The bias is an Add after the quantized conv, never the conv's own input (see onnx_graph.weighted).
    conv = next(n for n in folded.graph.node if n.name == "layer1.0.conv1")
    assert len(conv.input) == 2


def test_graph_has_dynamic_batch_opset_and_metadata():
    proto = model_to_onnx(make_model(4, 4), header(), "onnx")
    assert [o.version for o in proto.opset_import if o.domain == ""] == [OPSET]
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch"
    meta = {p.key: p.value for p in proto.metadata_props}
    import json

    assert json.loads(meta["classes"]) == CLASSES
    assert json.loads(meta["preprocess"])["mean"] == PREPROCESS["mean"] and json.loads(meta["preprocess"])["resize"] == 32
    assert json.loads(meta["distq"])["format"] == "onnx"
    x = images(5)
    assert run_onnx(proto, x).shape == (5, 10) and run_onnx(proto, x[:1]).shape == (1, 10)


# --- QONNX ---------------------------------------------------------------------------------


def qonnx_checked(proto):
    """The model through qonnx's own passes: cleanup (shape inference, constant folding that
    keeps Quant nodes), datatype inference; every tensor's shape must be known."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.util.cleanup import cleanup_model

    model = cleanup_model(ModelWrapper(proto), override_inpsize=1)
    model = model.transform(InferDataTypes(allow_scaledint_dtypes=True))
    assert model.check_all_tensor_shapes_specified()
    return model


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_qonnx_passes_qonnx_checks_and_its_executor_matches_onnxruntime(bits):
    from qonnx.core.onnx_exec import execute_onnx

    model = make_model(bits, bits, per_channel=bits == 1)
    qonnx_proto = model_to_onnx(model, header(), "qonnx")
    onnx.checker.check_model(qonnx_proto, full_check=True)
    wrapper = qonnx_checked(qonnx_proto)
    types = {n.name: str(wrapper.get_tensor_datatype(n.output[0])) for n in wrapper.graph.node if n.op_type in ("Quant", "BipolarQuant")}
    counts = {t: list(types.values()).count(t) for t in set(types.values())}
    quantized = sum(1 for _, m in quant_layers(model) if not isinstance(m, QAct))
    acts = sum(1 for _, m in quant_layers(model) if isinstance(m, QAct) and m.bits == bits)
    if bits == 1:  # BipolarQuant with a mean-abs scale, and 1-bit activations {0, 1} (scale 1: BINARY)
        assert sum(n.op_type == "BipolarQuant" for n in wrapper.graph.node) == quantized
        assert counts.get("BINARY") == acts
    else:  # k-bit activations; DoReFa weights are odd integers of the narrow signed (k + 1)-bit range
        assert counts == {f"SCALEDINT<{bits}>": acts, f"SCALEDINT<{bits + 1}>": quantized}
    x = images(3)
    expected = run_onnx(model_to_onnx(model, header(), "onnx"), x)
    name_in, name_out = wrapper.graph.input[0].name, wrapper.graph.output[0].name
    got = np.concatenate([execute_onnx(wrapper, {name_in: x[i : i + 1].numpy()})[name_out] for i in range(len(x))])
    assert (got.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(got, expected, rtol=0, atol=0.05 * np.abs(expected).max())


# --- what ONNX cannot express ----------------------------------------------------------------


def test_aqe_activation_is_refused_naming_the_layer():
    model = make_model(1, 2, method="aqe")
    for _, layer in quant_layers(model):
        layer.alpha = 1.0
    for fmt in ("onnx", "qonnx"):
        with pytest.raises(ExportError, match=r"cannot export layer 'relu' to ONNX: its 2-bit AQE activation is a ternary threshold computed per image"):
            model_to_onnx(model, header(), fmt)


def test_soft_aqe_weight_is_refused_naming_the_layer_and_alpha():
    model = make_model(2, 32, method="aqe")
    with pytest.raises(ExportError, match=r"cannot export layer 'layer1.0.conv1' to ONNX: its AQE weight has alpha 0.5 < 1.*precision.aqe"):
        model_to_onnx(model, header(), "onnx")
    for _, layer in quant_layers(model):
        layer.alpha = 1.0
    x = images(4)
    assert_same_logits(run_onnx(model_to_onnx(model, header(), "onnx"), x), model, x)  # AQE weights at alpha 1 export
