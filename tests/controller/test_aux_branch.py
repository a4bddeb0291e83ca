"""Auxiliary full-precision branch: each quantized conv computes LP(x) + f * FP(x); at f = 0
the network is exactly the plain low-precision one, and once f reaches 0 the branch is
removed (hooks, optimizer groups, checkpoint entries), leaving nothing to export."""

from __future__ import annotations

import copy

import pytest
import torch

from distq.config import config_from_dict, load_config
from distq.controller import Clock, Event, PrecisionController
from distq.controller.policies import AuxBranches
from distq.evaluate import evaluate_checkpoint
from distq.models.build import build_model
from distq.models.team import Member
from distq.quant.layers import QConv2d, quant_layers

SPE, EPOCHS = 10, 10


def aux_config(*overrides: str):
    return load_config(
        None,
        ["model.width=4", "model.small_input=true", "quant.w_bits=2", "quant.a_bits=2", f"train.epochs={EPOCHS}",
         "precision.aux_branch={decay: cosine, start: 1ep, end: 0.5dur}", *overrides],
    )


def models_and_input(cfg):
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.quant, 10)
    plain = copy.deepcopy(model)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return model, plain, x


def qconvs(model) -> list[QConv2d]:
    return [layer for _, layer in quant_layers(model) if isinstance(layer, QConv2d)]


def forward_hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_each_quantized_conv_gets_a_float_conv_and_bn_branch():
    model, _, x = models_and_input(aux_config())
    aux = AuxBranches(model)
    convs = dict((name, layer) for name, layer in model.named_modules() if isinstance(layer, QConv2d))
    assert sorted(aux.branches) == sorted(name.replace(".", "__") for name in convs)
    assert forward_hooks(model) == len(convs) == 19
    for name, layer in convs.items():
        conv, bn = aux.branches[name.replace(".", "__")]
        assert type(conv) is torch.nn.Conv2d and isinstance(bn, torch.nn.BatchNorm2d)
        assert torch.equal(conv.weight, layer.weight) and conv.weight.data_ptr() != layer.weight.data_ptr()
    # No branch parameter is a model parameter, and the model's state_dict is unchanged.
    assert not {id(p) for p in aux.parameters()} & {id(p) for p in model.parameters()}


def test_layer_output_is_lp_plus_f_times_fp():
    model, _, _ = models_and_input(aux_config())
    aux = AuxBranches(model)
    model.eval()
    aux.eval()  # the hook puts the branch in the model's mode; computed by hand here, so set it too
    layer = qconvs(model)[3]
    branch = aux.branches[next(n for n, m in model.named_modules() if m is layer).replace(".", "__")]
    x = torch.rand(2, layer.in_channels, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        low = layer._conv_forward(x, layer.quantized_weight(), layer.bias)
        full = branch(x)
        for f in (1.0, 0.3):
            aux.factor = f
            assert torch.equal(layer(x), low + f * full)
        aux.factor = 0.0
        assert torch.equal(layer(x), low)


def test_f_zero_equals_the_plain_low_precision_model_exactly():
    model, plain, x = models_and_input(aux_config())
    aux = AuxBranches(model)
    for mode in ("eval", "train"):  # eval first: train-mode forwards move the running statistics
        getattr(model, mode)()
        getattr(plain, mode)()
        with torch.no_grad():
            aux.factor = 0.5
            assert not torch.allclose(model(x), plain(x))
            aux.factor = 0.0
            assert torch.equal(model(x), plain(x))
    aux.detach_from_model()
    assert not aux.attached and forward_hooks(model) == 0
    aux.factor = 1.0  # detached: the factor no longer matters
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


def test_branch_batchnorm_follows_the_model_mode():
    model, _, x = models_and_input(aux_config())
    aux = AuxBranches(model)
    bn = next(iter(aux.branches.values()))[1]
    model.eval()
    with torch.no_grad():
        model(x)
    assert not bn.training and int(bn.num_batches_tracked) == 0
    model.train()
    model(x)
    assert bn.training and int(bn.num_batches_tracked) == 1


def test_controller_decays_f_and_removes_the_branch_at_zero():
    cfg = aux_config()
    model, plain, x = models_and_input(cfg)
    keys = set(plain.state_dict())
    ctl = PrecisionController(cfg, Clock(SPE, SPE * EPOCHS), [Member("model", 2, 2, 0.1, model)])
    removed = []
    ctl.when_aux_removed(lambda: removed.append(True))
    model.eval()
    plain.eval()

    expected_f = {0: 1.0, 10: 1.0, 30: 0.5, 49: None}
    for step, f in expected_f.items():
        ctl.on_event(Event.BATCH_START, step)
        assert ctl.aux["model"].factor == ctl.scalars()["aux/f"]
        if f is not None:
            assert ctl.aux["model"].factor == pytest.approx(f)
        assert ctl.aux["model"].attached and not removed
        assert "aux" in ctl.state_dict() and ctl.aux_parameters()["model"]
        with torch.no_grad():
            assert not torch.equal(model(x), plain(x))
    assert 0.0 < ctl.aux["model"].factor < 0.01  # step 49: the last step with a branch

    ctl.on_event(Event.BATCH_START, 50)  # end = 0.5dur = step 50: f = 0
    assert removed == [True] and ctl.aux_removed
    assert forward_hooks(model) == 0
    assert ctl.aux_parameters() == {}
    state = ctl.state_dict()
    assert "aux" not in state and state["aux_removed"] is True and state["precision"]["aux_f"] == 0.0
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    assert set(model.state_dict()) == keys

    ctl.on_event(Event.BATCH_START, 51)
    assert removed == [True]  # removed once only


def test_step_decay_halves_and_removes():
    cfg = aux_config("precision.aux_branch={decay: step, start: 0ep, end: 4ep, halve_every: 1ep}")
    model, _, _ = models_and_input(cfg)
    ctl = PrecisionController(cfg, Clock(SPE, SPE * EPOCHS), [Member("model", 2, 2, 0.1, model)])
    factors = []
    for step in (0, 9, 10, 20, 39):
        ctl.on_event(Event.BATCH_START, step)
        factors.append(ctl.aux["model"].factor)
    assert factors == [1.0, 1.0, 0.5, 0.25, 0.125]
    ctl.on_event(Event.BATCH_START, 40)
    assert ctl.aux_removed and forward_hooks(model) == 0


def test_controller_state_restores_the_branches_or_their_removal():
    cfg = aux_config()
    model, _, _ = models_and_input(cfg)
    ctl = PrecisionController(cfg, Clock(SPE, SPE * EPOCHS), [Member("model", 2, 2, 0.1, model)])
    with torch.no_grad():
        for p in ctl.aux["model"].parameters():
            p.add_(0.25)
    ctl.on_event(Event.BATCH_START, 30)
    saved = ctl.state_dict()

    fresh_model, _, _ = models_and_input(cfg)
    fresh = PrecisionController(cfg, Clock(SPE, SPE * EPOCHS), [Member("model", 2, 2, 0.1, fresh_model)])
    fresh.load_state_dict(saved)
    for (name, a), (_, b) in zip(ctl.aux["model"].state_dict().items(), fresh.aux["model"].state_dict().items()):
        assert torch.equal(a, b), name
    assert fresh.current == ctl.current

    ctl.on_event(Event.BATCH_START, 50)
    gone = PrecisionController(cfg, Clock(SPE, SPE * EPOCHS), [Member("model", 2, 2, 0.1, models_and_input(cfg)[0])])
    gone.load_state_dict(ctl.state_dict())
    assert gone.aux_removed and forward_hooks(gone.students[0].model) == 0 and gone.aux_parameters() == {}


# --- a real run ---------------------------------------------------------------------------------


def test_tiny_run_ends_without_any_branch(tmp_path, make_image_folder, tiny_args, run_distq, checkpoint_of):
    root = make_image_folder(tmp_path / "data", classes=("a", "b", "c", "d"), per_class=24, size=(32, 32))
    run_dir = tmp_path / "run"
    # 6 steps per epoch, 2 epochs: f reaches 0 at step 9, in the middle of epoch 2.
    proc = run_distq(*tiny_args(
        run_dir, f"data.root={root}", "data.batch_size=16", "log.tensorboard=false", "run.keep_checkpoints=2",
        "precision.aux_branch={decay: cosine, start: 0ep, end: 9ba}", config="digits_resnet18_w2a2_aux.yaml",
    ))
    assert proc.returncode == 0, proc.stderr

    first = checkpoint_of(run_dir / "checkpoints" / "step_00000006")  # step 6: the branch is still there
    assert first["controller"]["aux_removed"] is False
    assert first["controller"]["precision"]["aux_f"] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 5 / 9)).item()))
    assert len(first["controller"]["aux"]["model"]) > 0
    assert any(name.startswith("extra.model.") for name in first["optimizer"])  # the branches' momentum

    last = checkpoint_of(run_dir)
    assert (last["epoch"], last["step"]) == (2, 12)
    controller = last["controller"]
    assert "aux" not in controller and controller["aux_removed"] is True and controller["precision"]["aux_f"] == 0.0

    cfg = config_from_dict(last["config"])
    plain = build_model(cfg.model, cfg.quant, 4)
    weights = last["models"]["model"]
    assert set(weights) == set(plain.state_dict())
    for name, value in plain.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert weights[name].shape == value.shape, name
    # The branches left the optimizer: its state is the plain model's parameters' alone.
    assert set(last["optimizer"]) == {f"models.model.{name}" for name, _ in plain.named_parameters()}

    # The saved weights alone, in a plain model, give the accuracy the run reported last.
    assert evaluate_checkpoint(str(run_dir))["val/top1"] == last["history"][-1]["val/top1"]
