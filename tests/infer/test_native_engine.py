"""A whole model on the native kernels equals the same model on the torch reference kernels,
layer by layer, bit for bit: every integer activation, every conv/linear output (the
affine is fused into the native GEMM), every float layer and max-pool, and the logits.

Models are random (see conftest.py); widths 5 and 8 give channel counts of 5..64 that
fill no 64-bit word, odd image sizes give odd feature maps, and the ImageNet stem adds
the max-pool of integer activations.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from distq.errors import DistqError
from distq.export.exporter import export_model
from distq.infer import native
from distq.infer.bitops import PlaneCode
from distq.infer.engine import build_engine
from distq.infer.layers import BitConv2d, BitLinear, CodedMaxPool2d, FloatLayer, IntAct, coded
from distq.native import library
from distq.native.build import compiler
from distq.native.library import available_isas, load

needs_native = pytest.mark.skipif(load() is None, reason="native kernels unavailable (no C++ compiler)")


def test_the_kernels_build_wherever_a_compiler_exists():
    """Not skipped with the others: a compiler that fails on the sources is a failure."""
    if compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    assert load() is not None and "portable" in available_isas(load())

ENGINE_LAYERS = (BitConv2d, BitLinear, IntAct, FloatLayer, CodedMaxPool2d)


def _record_outputs(net):
    """{module name: (values, integers or None)} of every engine layer, filled by a forward."""
    seen = {}
    for name, module in net.named_modules():
        if isinstance(module, ENGINE_LAYERS):
            module.register_forward_hook(
                lambda m, i, o, name=name: seen.__setitem__(name, (o.as_subclass(torch.Tensor).clone(), getattr(o, "ints", None)))
            )
    return seen


def assert_same_layers(export, images, dtype):
    """Run the reference kernels, the native ones, and the native ones with each conv fused
    with the activation (and pool) after it, on the same export, and compare every layer:
    all of them unfused; fused, all but the inner modules of each fused chain, whose outputs
    are the chain's last module's."""
    engines = {
        "reference": build_engine(export, dtype, kernels="reference"),
        "native": build_engine(export, dtype, kernels="native", fuse=False),
        "fused": build_engine(export, dtype, kernels="native"),
    }
    assert engines["native"].kernels.startswith("native") and engines["reference"].kernels == "reference"
    assert not engines["native"].fused
    seen = {k: _record_outputs(e.net) for k, e in engines.items()}
    logits = {k: e(images) for k, e in engines.items()}
    inside_chains = {name for chain in engines["fused"].fused for name in chain[:-1]}
    for kind in ("native", "fused"):
        skipped = set(seen["reference"]) - set(seen[kind])  # modules a fused chain does not call
        assert seen[kind] and skipped <= (inside_chains if kind == "fused" else set()), skipped
        for name, (values, ints) in seen["reference"].items():
            if kind == "fused" and name in inside_chains:
                continue
            got_values, got_ints = seen[kind][name]
            assert torch.equal(got_values, values), f"{kind} {name}: {(got_values != values).sum().item()} values differ"
            if ints is not None:
                assert torch.equal(got_ints, ints), f"{kind} {name}: {(got_ints != ints).sum().item()} integers differ"
        assert torch.equal(logits[kind], logits["reference"])
        assert engines[kind].layer_modes() == engines["reference"].layer_modes()  # the same path, bit or float, per layer
    return seen["reference"], engines["fused"].fused, engines["reference"].layer_modes()


CASES = [  # method, w_bits, a_bits
    ("dorefa", 1, 1),
    ("dorefa", 2, 2),
    ("dorefa", 4, 4),
    ("dorefa", 3, 2),
    ("dorefa", 1, 4),
    ("dorefa", 8, 8),
    ("dorefa", 5, 7),
    ("aqe", 1, 1),
    ("aqe", 2, 2),
    ("aqe", 3, 3),
    ("aqe", 1, 2),
    pytest.param("aqe", 5, 5, marks=pytest.mark.slow),  # 16 x 17 planes: slow on the reference kernels
]


@needs_native
@pytest.mark.parametrize("method,w_bits,a_bits", CASES)
def test_every_layer_equals_the_reference_engine(random_resnet, resnet_header, method, w_bits, a_bits):
    width = 5 if (w_bits + a_bits) % 2 else 8  # channels 5..40 or 8..64: words never full
    model = random_resnet(method, w_bits, a_bits, width=width)
    export, _ = export_model(model, resnet_header(width=width))
    images = torch.randn(3, 3, 27, 29, generator=torch.Generator().manual_seed(1))
    seen, fused, modes = assert_same_layers(export, images, torch.float32)
    assert all(m == {"bit": 1, "float": 0} for m in modes.values())  # every quantized layer on bit operations
    acts = [ints for name, (_, ints) in seen.items() if ints is not None]
    assert len(acts) == 16 and all(a.unique().numel() > 1 for a in acts)  # no constant activation: the test proves something
    # Where the activations are DoReFa: the float stem conv with its activation, every block's
    # conv1 with its relu, and conv2 with the residual add and act_out, except the last
    # block's (full precision, before the pooling).
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    expected = [("conv1", "relu")] + [(f"{b}.conv{k}", f"{b}.{act}") for b in blocks for k, act in ((1, "relu"), (2, "act_out"))][:-1]
    assert fused == (expected if method == "dorefa" else [])


@needs_native
@pytest.mark.parametrize("method,w_bits,a_bits", [("dorefa", 2, 2), ("aqe", 2, 3)])
def test_float64_engines_agree(random_resnet, resnet_header, method, w_bits, a_bits):
    export, _ = export_model(random_resnet(method, w_bits, a_bits), resnet_header())
    assert_same_layers(export, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.float64)


@needs_native
@pytest.mark.parametrize("batch", [1, 2])
def test_imagenet_stem_and_integer_max_pool(random_resnet, resnet_header, batch):
    """Fused, the float stem conv's affine, activation and max-pool are one native pass."""
    export, _ = export_model(random_resnet("dorefa", 1, 1, width=5, small_input=False), resnet_header(61, width=5))
    images = torch.randn(batch, 3, 61, 61, generator=torch.Generator().manual_seed(3))
    _, fused, _ = assert_same_layers(export, images, torch.float32)
    assert fused[0] == ("conv1", "relu", "maxpool")


@needs_native
@pytest.mark.parametrize("a_bits,code", [(3, PlaneCode("unsigned", 3)), (1, PlaneCode("sign", 1))])
def test_quantized_linear_on_integers(a_bits, code):
    """A BitLinear fed integers (AlexNet's classifier.4): native equals reference."""
    g = torch.Generator().manual_seed(0)
    ints = 2 * torch.randint(0, 2, (13, 130), generator=g) - 1
    args = (ints, 1, 1, torch.rand(13, generator=g, dtype=torch.float64), torch.rand(13, generator=g, dtype=torch.float64))
    shift = torch.randn(13, generator=g, dtype=torch.float64)
    layers = {k: BitLinear(*args, shift, torch.float32, native=k) for k in (True, False)}
    if code.kind == "sign":
        x = (2 * torch.randint(0, 2, (5, 130), generator=g) - 1).to(torch.int8)
    else:
        x = torch.randint(0, 1 << a_bits, (5, 130), generator=g, dtype=torch.uint8)
    inputs = coded(x.float() / 7, x, code, 1 / 7)
    assert torch.equal(layers[True](inputs), layers[False](inputs))


@pytest.mark.slow
@needs_native
def test_alexnet_equals_the_reference_engine(random_alexnet):
    """Max-pools of integer activations, and a quantized linear on integers (classifier.4)."""
    model, header = random_alexnet()
    assert_same_layers(export_model(model, header)[0], torch.randn(2, 3, 32, 32), torch.float32)


@pytest.mark.slow
@needs_native
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_resnet18_at_224_equals_the_reference_engine(random_resnet, resnet_header, bits):
    """The benchmark's model (width 64, ImageNet stem), two images."""
    export, _ = export_model(random_resnet("dorefa", bits, bits, width=64, small_input=False), resnet_header(224, width=64))
    assert_same_layers(export, torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4)), torch.float32)


def test_kernel_choice(monkeypatch):
    assert not native.use_native("reference")
    with pytest.raises(DistqError, match="kernels must be one of auto, native, reference"):
        native.use_native("fast")
    monkeypatch.setitem(library._state, "lib", None)  # as on a machine where they do not build
    assert not native.use_native("auto") and native.describe() == "reference"
    with pytest.raises(DistqError, match="native bit kernels are not available"):
        native.use_native("native")


def test_without_a_compiler_the_engine_says_so_once_and_runs_the_reference(random_resnet, resnet_header, tmp_path):
    export, _ = export_model(random_resnet("dorefa", 2, 2), resnet_header())
    from distq.export.format import write_export

    path = tmp_path / "model.safetensors"
    write_export(export, path)
    script = (
        "import sys, torch\n"
        "from distq.infer.engine import load_engine\n"
        f"engines = [load_engine({str(path)!r}) for _ in range(2)]\n"
        "print(engines[0].kernels, engines[0](torch.zeros(1, 3, 32, 32)).shape[1])\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), DISTQ_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["reference", "10"]
    notes = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(notes) == 1 and notes[0].startswith("distq: note: native kernels unavailable (no C++ compiler found"), notes
