"""docs/format.md specifies the packed export: ``format_reader.py``, a numpy-only reader written
from that document alone, decodes exported files and runs the digits ResNet-18 (width 4, small
input) on the 355 val images, and must reproduce distq's integer engine: logits equal up to float
rounding, the same top-1 class on every image.

The models: a full-precision ResNet-18 trained 80 steps once per module, then per case its
quantized copy, LSQ's steps by the method's own calibration (``distq.quant.calibrate``), PACT's
clipping levels at 2, AQE at the end of its alpha schedule, fine-tuned 20 steps, so that scales,
steps and clipping levels are learned values, different per layer and channel.
"""

from __future__ import annotations

import ast
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from format_reader import PackedModel, read, unpack
from single_thread import one_thread, sgd_steps

from distq.config.schema import ModelConfig, QuantConfig
from distq.data.transforms import preprocess_description
from distq.export.exporter import export_model
from distq.export.format import pack_planes, read_export, write_export
from distq.infer.engine import build_engine
from distq.models.build import build_model
from distq.quant.calibrate import calibrate
from distq.quant.layers import quant_layers

READER = Path(__file__).with_name("format_reader.py")
WIDTH = 4


pytestmark = pytest.mark.usefixtures("single_threaded")


def header(width=WIDTH, image_size=32):
    return {
        "model": {"arch": "resnet18", "width": width, "small_input": image_size <= 32, "num_classes": 10},
        "quant": {},
        "preprocess": preprocess_description(image_size, 1.0),
        "classes": [str(i) for i in range(10)],
    }


def resnet(method="dorefa", bits=32, per_channel=False, small_input=True):
    torch.manual_seed(0)
    quant = QuantConfig(w_bits=bits, a_bits=bits, method=method, per_channel=per_channel)
    return build_model(ModelConfig(arch="resnet18", width=WIDTH, small_input=small_input), quant, 10)


def train(model, images, labels, steps: int, lr: float):
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    sgd_steps(model, optimizer, images, labels, steps, generator)
    return model.eval()


@pytest.fixture(scope="module")
def digits(digits_root):
    """(train images, train labels, val images, val labels), as the val transform makes them."""
    from distq.data.folder import image_folder
    from distq.data.transforms import val_transform

    def split(name):
        data = image_folder(digits_root, name, val_transform(32, 1.0))
        images, labels = zip(*(data[i] for i in range(len(data))))
        return torch.stack(images), torch.tensor(labels)

    return (*split("train"), *split("val"))


@pytest.fixture(scope="module")
def float_state(digits):
    with one_thread():
        model = train(resnet(), digits[0], digits[1], steps=80, lr=0.1)
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def exported(model, tmp_path, name="model.safetensors", image_size=32) -> Path:
    export, _ = export_model(model, header(image_size=image_size))
    path = tmp_path / name
    write_export(export, path)
    return path


CASES = [
    ("dorefa", 4, False, 1),
    ("lsq", 2, True, 2),
    ("pact", 3, False, 2),
    ("dorefa", 1, True, 1),  # binary weights +-mean|w| per channel, activations {0, 1}
    ("aqe", 2, False, 1),  # ternary weights, per-image ternary activations
]


@pytest.mark.parametrize("method,bits,per_channel,version", CASES, ids=[f"{c[0]}-w{c[1]}a{c[1]}" for c in CASES])
def test_reader_written_from_the_spec_reproduces_the_integer_engine(method, bits, per_channel, version, digits, float_state, tmp_path):
    x_train, y_train, x_val, y_val = digits
    model = resnet(method, bits, per_channel)
    model.load_state_dict(float_state, strict=False)
    for _, layer in quant_layers(model):
        layer.alpha = 1.0  # AQE: the end of its schedule (what is exported)
        if hasattr(layer, "act_clip"):
            layer.act_clip.data.fill_(2.0)
    model.train()
    calibrate([model], x_train[:256], lambda t: t)
    train(model, x_train, y_train, steps=20, lr=0.02)
    path = exported(model, tmp_path)

    expected = build_engine(read_export(path), kernels="reference")(x_val).numpy()
    reader = PackedModel(path.read_bytes())
    assert reader.header["version"] == version
    got = np.concatenate([reader(x_val[i : i + 128].numpy()) for i in range(0, len(x_val), 128)])
    gap = np.abs(got - expected).max()
    print(f"format reader vs integer engine, {method} W{bits}A{bits}, 355 val images: max |logit diff| {gap:.2g} (max |logit| {np.abs(expected).max():.3g})")
    assert got.shape == (355, 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_reader_runs_the_imagenet_stem_with_its_max_pool(tmp_path):
    """small_input off: the 7x7 stride-2 stem and the max-pool that keeps integers (random weights, 64x64)."""
    model = resnet("lsq", 4, small_input=False)
    images = torch.randn(6, 3, 64, 64)
    model.train()
    calibrate([model], images, lambda t: t)
    path = exported(model.eval(), tmp_path, image_size=64)
    expected = build_engine(read_export(path), kernels="reference")(images).numpy()
    got = PackedModel(path.read_bytes())(images.numpy())
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_the_documents_packing_example_is_what_distq_writes():
    """docs/format.md, section 5: codes [5, 0, 3] at 3 bits are the bytes 05 04 01."""
    planes = pack_planes(torch.tensor([5, 0, 3], dtype=torch.uint8), 3)
    assert planes.numpy().tolist() == [[0x05], [0x04], [0x01]]
    assert unpack(planes.numpy(), 3, (3,)).tolist() == [5, 0, 3]
    codes = torch.randint(0, 8, (7, 3, 3, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert (unpack(pack_planes(codes, 3).numpy(), 3, codes.shape) == codes.numpy()).all()


def test_reader_refuses_a_newer_version(tmp_path):
    data = exported(resnet("dorefa", 2).eval(), tmp_path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    table = json.loads(data[8 : 8 + n])
    distq_header = json.loads(table["__metadata__"]["distq"])
    assert read(data)[0]["version"] == 1
    distq_header["version"] = 3
    table["__metadata__"]["distq"] = json.dumps(distq_header)
    head = json.dumps(table).encode()
    with pytest.raises(ValueError, match="format version 3"):
        read(struct.pack("<Q", len(head)) + head + data[8 + n :])


def test_reader_imports_only_numpy_json_struct_math():
    tree = ast.parse(READER.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"numpy", "json", "struct", "math", "__future__"}, imported
