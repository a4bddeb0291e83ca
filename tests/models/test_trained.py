"""One way from a training checkpoint to its models (``distq.models.trained``): the networks come
back with their trained weights and bits, without the file the run started from."""

from __future__ import annotations

import json

import pytest
import torch

from distq.checkpoint import CheckpointError
from distq.config.schema import ModelConfig, QuantConfig
from distq.evaluate import evaluate_checkpoint
from distq.models.build import build_model
from distq.models.trained import load_trained
from distq.quant.layers import QAct, quant_layers


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory, make_image_folder, tiny_args, run_distq):
    """A one-epoch W2A3 run started from a float state_dict file, which is deleted afterwards."""
    base = tmp_path_factory.mktemp("pretrained-run")
    root = make_image_folder(base / "data", classes=("a", "b", "c", "d"), per_class=8, size=(32, 32))
    weights = base / "float.pth"
    torch.manual_seed(3)
    float_model = build_model(ModelConfig(arch="resnet18", width=4, small_input=True, num_classes=4), QuantConfig(), 4)
    torch.save({k: v for k, v in float_model.state_dict().items() if not k.endswith("_extra_state")}, weights)
    run_dir = base / "run"
    done = run_distq(*tiny_args(
        run_dir, f"data.root={root}", "data.batch_size=8", "train.epochs=1", "train.warmup_epochs=0", "log.tensorboard=false",
        "quant.w_bits=2", "quant.a_bits=3", f"model.pretrained={weights}",
    ))
    assert done.returncode == 0, done.stderr
    weights.unlink()
    return run_dir


def test_eval_of_a_run_started_from_a_pretrained_file_that_is_gone(pretrained_run):
    results = json.loads((pretrained_run / "results.json").read_text())
    assert evaluate_checkpoint(str(pretrained_run)) == {"val/top1": results["val/top1"], "val/top5": results["val/top5"]}


def test_the_model_comes_back_with_its_weights_and_bits(pretrained_run, checkpoint_of):
    trained = load_trained(pretrained_run)
    assert trained.cfg.model.pretrained is None and trained.names == ["model"] and trained.classes == ["a", "b", "c", "d"]
    model = trained.model()
    assert not model.training
    saved = checkpoint_of(pretrained_run)["models"]["model"]
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, saved[name]), name
    assert {layer.bits for _, layer in quant_layers(model) if isinstance(layer, QAct)} == {3}
    assert {layer.bits for _, layer in quant_layers(model) if not isinstance(layer, QAct)} == {2}
    with pytest.raises(CheckpointError, match="has no model 'guide': choose one of model"):
        trained.model("guide")


def test_a_run_directory_as_pretrained_gives_its_weights_but_not_its_precision(pretrained_run, checkpoint_of):
    """Fine-tuning from a distq run: the weights come from its checkpoint, the bits and the quantizer
    stay the new config's (the checkpoint's W2A3 DoReFa state must not turn a W1A1 AQE model into it)."""
    from distq.models.build import load_float_weights

    model = build_model(ModelConfig(arch="resnet18", width=4, small_input=True, num_classes=4), QuantConfig(w_bits=1, a_bits=1, method="aqe"), 4)
    load_float_weights(model, str(pretrained_run))
    saved = checkpoint_of(pretrained_run)["models"]["model"]
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, saved[name]), name
    assert {layer.bits for _, layer in quant_layers(model)} == {1}
    assert {layer.method for _, layer in quant_layers(model)} == {"aqe"}


def test_export_and_the_verifier_rebuild_the_trained_model_without_the_pretrained_file(pretrained_run):
    """distq export and the integer engine's verifier take the same way (the file the run started from is gone)."""
    from distq.export.exporter import checkpoint_model
    from distq.infer.verify import reference_model

    expected = {k: v for k, v in load_trained(pretrained_run).model().state_dict().items() if isinstance(v, torch.Tensor)}
    exported, header = checkpoint_model(str(pretrained_run))
    verified, _ = reference_model(str(pretrained_run))
    assert header["source"]["model"] == "model" and header["classes"] == ["a", "b", "c", "d"]
    for model in (exported, verified):
        state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)
