"""The benchmarks time the trainer's own step: ``benchmarks/guided_step.py`` builds it through
``distq.train.step.build_step`` as the trainer does, and from the same config, state and batch
both give the same losses and the same weights after the optimizer step."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from distq.config import load_config
from distq.train.trainer import Trainer

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_the_guided_benchmark_step_is_the_trainers_step(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import guided_step
    finally:
        sys.path.remove(str(BENCHMARKS))
    cfg = load_config(CONFIGS / "digits_resnet18_w4a4_guided.yaml", [
        "model.width=4", "data.batch_size=16", "data.workers=0", "log.progress=false", "log.tensorboard=false",
        f"run.dir={tmp_path / 'run'}", "dist.engine=torch", "guided.students=[{w_bits: 4, a_bits: 4}, {w_bits: 2, a_bits: 2}]",
    ])
    torch.set_num_threads(1)
    trainer = Trainer(cfg)
    images, labels, _ = next(iter(trainer.data.train))
    bench = guided_step.guided_train_step(cfg, len(trainer.data.classes), images.shape[0])
    assert set(bench.models) == set(trainer.models)
    for name in trainer.models:  # the same starting weights
        for (key, a), b in zip(trainer.models[name].state_dict().items(), bench.models[name].state_dict().values()):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key
    bench_groups = [(g["model"], len(g["params"]), g["weight_decay"]) for g in bench.engine.optimizer.param_groups]
    assert bench_groups == [(g["model"], len(g["params"]), g["weight_decay"]) for g in trainer.engine.optimizer.param_groups]

    results = []
    for step in (trainer.parts, bench):
        step.engine.team.train()
        step.start(0)
        losses = step(images, labels)
        step.finish(0)
        results.append((losses, {n: p.detach().clone() for n, p in step.engine.team.named_parameters()}))
    (trainer_losses, trainer_weights), (bench_losses, bench_weights) = results
    assert trainer_losses.keys() == bench_losses.keys()
    for name in trainer_losses:
        assert torch.equal(trainer_losses[name], bench_losses[name]), name
    assert trainer_weights.keys() == bench_weights.keys()
    for name, weight in trainer_weights.items():
        assert torch.equal(weight, bench_weights[name]), name
    trainer.lock.release()
