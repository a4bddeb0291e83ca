"""train.compile: compiled models train what eager models train.

- a compiled W4A4 ResNet and a compiled guided team (FP guide + W4A4 student, mutual KD) give
  the eager gradients (float tolerance: the compiler reorders sums) and every parameter a
  non-zero gradient (the compiled activation quantizer once gave an all-zero gradient on CUDA,
  see tests/gpu/compiled_act_quant_repro.py);
- a progressive schedule (32 -> 8 -> 4 -> 2 bits) recompiles once per precision state, not
  once per step;
- train.compile=true trains through the CLI (inductor, the C++ backend on the CPU).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from distq.config import load_config
from distq.controller import Clock, Event, PrecisionController
from distq.models.build import build_model
from distq.models.team import Member, build_team
from distq.train.team import build_objective


def small_config(*overrides: str):
    return load_config(None, ["model.width=4", "model.small_input=true", "quant.w_bits=4", "quant.a_bits=4", "train.epochs=4", *overrides])


def gradients(model, loss_fn, x, y) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_close_gradients(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, grad in want.items():
        assert got[name] is not None and bool(got[name].abs().sum() > 0), f"{name}: no gradient"
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item(), msg=name)


# aot_eager traces forward and backward as the compiler does (AOTAutograd) without generating
# code: seconds. inductor generates C++ on the CPU: minutes here, so slow.
BACKENDS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]


@pytest.mark.parametrize("method", ["dorefa", "lsq", "pact"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_compiled_w4a4_model_gives_the_eager_gradients(backend, method):
    """With every quantizer method: LSQ's and PACT's custom operators carry their parameters' gradients."""
    from distq.quant.calibrate import calibrate

    cfg = small_config(f"quant.method={method}")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.quant, 10).train()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    calibrate([model], x, lambda t: t)  # LSQ's steps as training starts them
    with torch.no_grad():  # PACT: clip low enough that every alpha has a gradient
        for name, param in model.named_parameters():
            if name.endswith("act_clip"):
                param.fill_(0.5)
    compiled = copy.deepcopy(model)
    compiled.compile(backend=backend)
    loss = torch.nn.functional.cross_entropy
    assert_close_gradients(gradients(compiled, loss, x, y), gradients(model, loss, x, y))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_compiled_guided_team_gives_the_eager_gradients(backend):
    cfg = small_config("guided={students: [{w_bits: 4, a_bits: 4}]}")
    torch.manual_seed(0)
    team = build_team(cfg, 10)
    objective = build_objective(cfg, team)
    models = torch.nn.ModuleDict({m.name: m.model.train() for m in team})
    compiled = copy.deepcopy(models)
    for model in compiled.values():
        model.compile(backend=backend)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))

    def step(mods):
        mods.zero_grad(set_to_none=True)
        losses = objective({name: m(x) for name, m in mods.items()}, y, None)
        torch.stack(list(losses.values())).sum().backward()
        return {n: p.grad.clone() for n, p in mods.named_parameters()}

    assert_close_gradients(step(compiled), step(models))


def test_a_progressive_schedule_recompiles_once_per_precision_state():
    cfg = small_config("precision.progressive={w_bits: [32, 8, 4], a_bits: [32, 8, 4], stages: [3ba, 3ba]}", "quant.w_bits=4")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.quant, 10).train()
    controller = PrecisionController(cfg, Clock(5, 20), [Member("model", 4, 4, cfg.train.lr, model)])
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model.compile(backend=counting_backend)
    x = torch.randn(4, 3, 16, 16)
    states = set()
    for step in range(20):
        controller.on_event(Event.BATCH_START, step)
        states.add(tuple(layer.bits for layer in model.modules() if hasattr(layer, "bits")))
        model(x).sum().backward()
    assert len(states) == 3  # 32, 8 and 4 bits
    assert len(graphs) == len(states), f"{len(graphs)} compilations over 20 steps and {len(states)} precision states"


def test_train_compile_rejects_a_schedule_that_changes_every_step():
    with pytest.raises(Exception, match="train.compile cannot be combined with precision.stochastic"):
        small_config("train.compile=true", "precision.stochastic={p0: 0.5}")


@pytest.mark.slow
def test_train_compile_trains_through_the_cli(tmp_path, tiny_args, run_distq, digits_root):
    done = run_distq(*tiny_args(tmp_path / "run", "train.compile=true", "train.epochs=1", "train.warmup_epochs=0"), timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["epochs"] == 1
