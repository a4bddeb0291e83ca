"""``distq export --format qonnx|onnx --batch N``: a fixed batch dimension, so that qonnx's
``cleanup_model`` and executor run the file as it is (no ``override_inpsize``); without
``--batch`` the batch stays dynamic. And what qonnx's own conversions make of a W1A1 export
(docs/export.md, "ONNX and QONNX export")."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from distq.cli import main
from distq.config.schema import ModelConfig, QuantConfig
from distq.export.onnx_export import model_to_onnx
from distq.models.build import build_model

HEADER = {
    "model": {"arch": "resnet18", "width": 4, "small_input": True, "num_classes": 10},
    "preprocess": {"image_size": 32, "val_crop_ratio": 1.0},
    "classes": [str(i) for i in range(10)],
}


def batch_dims(path_or_proto) -> tuple:
    proto = onnx.load(str(path_or_proto)) if not isinstance(path_or_proto, onnx.ModelProto) else path_or_proto
    dims = [proto.graph.input[0].type.tensor_type.shape.dim[0], proto.graph.output[0].type.tensor_type.shape.dim[0]]
    return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims)


def val_image(digits_root) -> np.ndarray:
    from distq.data.folder import load_rgb
    from distq.data.transforms import val_transform

    path = sorted((digits_root / "val" / "digit_7").iterdir())[0]
    return val_transform(32, 1.0)(load_rgb(str(path))).numpy()[None]


def test_qonnx_with_batch_1_runs_in_qonnx_without_override_and_matches_the_integer_engine(tiny_run, digits_root, tmp_path, capsys):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.util.cleanup import cleanup_model

    from distq.infer.engine import load_engine

    qonnx_file, packed = tmp_path / "b1.qonnx.onnx", tmp_path / "m.safetensors"
    assert main(["export", str(tiny_run), "--format", "qonnx", "--batch", "1", "--out", str(qonnx_file)]) == 0
    assert main(["export", str(tiny_run), "--out", str(packed)]) == 0
    capsys.readouterr()
    assert batch_dims(qonnx_file) == (1, 1)
    model = cleanup_model(ModelWrapper(str(qonnx_file)))
    assert model.check_all_tensor_shapes_specified()
    image = val_image(digits_root)
    got = execute_onnx(model, {model.graph.input[0].name: image})[model.graph.output[0].name]
    expected = load_engine(packed, kernels="reference")(torch.from_numpy(image)).numpy()
    print(f"qonnx executor (batch 1, no override) vs integer engine: max |logit diff| {np.abs(got - expected).max():.2g}")
    assert got.shape == (1, 10) and got.argmax(1) == expected.argmax(1)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3 * np.abs(expected).max())


def test_batch_is_dynamic_by_default_and_onnx_files_of_a_fixed_batch_run_any_number_of_images(tmp_path):
    from distq.infer.onnx_runtime import OnnxModel

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", width=4, small_input=True), QuantConfig(w_bits=2, a_bits=2), 10).eval()
    assert batch_dims(model_to_onnx(model, HEADER, "qonnx")) == ("batch", "batch")
    files = {}
    for batch in (None, 4):
        files[batch] = tmp_path / f"b{batch}.onnx"
        proto = model_to_onnx(model, HEADER, "onnx", batch=batch)
        files[batch].write_bytes(proto.SerializeToString())
    assert batch_dims(files[None]) == ("batch", "batch") and batch_dims(files[4]) == (4, 4)
    images = torch.randn(6, 3, 32, 32)
    fixed, dynamic = OnnxModel(files[4]), OnnxModel(files[None])
    assert fixed.batch == 4 and dynamic.batch is None
    np.testing.assert_allclose(fixed(images).numpy(), dynamic(images).numpy(), rtol=0, atol=1e-5)  # chunks of 4, the last padded


@pytest.mark.parametrize("argv,words", [
    (["--batch", "0"], "argument --batch: '0' is not a positive integer"),
    (["--batch", "x"], "argument --batch: 'x' is not a positive integer"),
])
def test_batch_must_be_a_positive_integer(argv, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", "RUN", "--format", "qonnx", "--out", str(tmp_path / "m.onnx"), *argv])
    assert info.value.code == 2 and words in capsys.readouterr().err


def test_batch_with_a_safetensors_export_is_one_error_line(tiny_run, tmp_path, capsys):
    assert main(["export", str(tiny_run), "--batch", "2", "--out", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("distq: error: --batch applies to --format onnx, ")
    assert err[0].endswith("qonnx: a safetensors export has no fixed batch size")
    assert not (tmp_path / "m.safetensors").exists()


def test_what_qonnx_conversions_make_of_a_w1a1_export():
    """docs/export.md's line: a W1A1 QONNX file (BipolarQuant weights, 1-bit unsigned Quant
    activations) passes cleanup and runs in qonnx's executor, but qonnx's conversions leave its
    1-bit parts as they are: QuantToQCDQ takes Quant nodes of 2..8 bits and no BipolarQuant,
    LowerConvsToMatMul skips convs whose weight is a BipolarQuant output (not an initializer),
    and ConvertBipolarMatMulToXnorPopcount needs bipolar activations (distq's are {0, 1})."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.bipolar_to_xnor import ConvertBipolarMatMulToXnorPopcount
    from qonnx.transformation.lower_convs_to_matmul import LowerConvsToMatMul
    from qonnx.transformation.qonnx_to_qcdq import QuantToQCDQ
    from qonnx.util.cleanup import cleanup_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", width=4, small_input=True), QuantConfig(w_bits=1, a_bits=1, per_channel=True), 10).eval()
    wrapper = cleanup_model(ModelWrapper(model_to_onnx(model, HEADER, "qonnx", batch=1)))
    x = torch.randn(1, 3, 32, 32)
    out = execute_onnx(wrapper, {wrapper.graph.input[0].name: x.numpy()})[wrapper.graph.output[0].name]
    assert out.argmax() == model(x).argmax()
    ops = Counter(n.op_type for n in wrapper.graph.node)
    assert ops["BipolarQuant"] == 19 and ops["Quant"] == 16  # 19 binary convs, 16 one-bit activations

    qcdq = Counter(n.op_type for n in wrapper.transform(QuantToQCDQ()).graph.node)
    assert qcdq["BipolarQuant"] == 19 and qcdq["Quant"] == 16 and qcdq["QuantizeLinear"] == 0
    with pytest.warns(UserWarning, match="Found Conv node with non-initialized weight, skipping"):
        lowered = wrapper.transform(LowerConvsToMatMul())
    assert Counter(n.op_type for n in lowered.graph.node)["Conv"] == 19  # only the float first conv became a MatMul
    xnor = Counter(n.op_type for n in lowered.transform(ConvertBipolarMatMulToXnorPopcount()).graph.node)
    assert xnor["XnorPopcountMatMul"] == 0 and xnor["MatMul"] == 1
