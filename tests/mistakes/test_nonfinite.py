"""Non-finite training stops, loudly, and never reaches a checkpoint.

- train.lr=1e6 (the loss is NaN within a few steps): exit status 4 within the first epoch, one
  line naming the step and the quantity, no checkpoint written;
- a NaN batch after a checkpoint: the run stops, the last good checkpoint is byte-identical;
- train.on_nonfinite=skip with one injected NaN batch: the run finishes, TensorBoard counts exactly
  one skipped step, and no saved tensor is non-finite (the batch-norm statistics the NaN batch
  touched are restored); many in a row stop the run;
- a checkpoint holding a NaN is never written (checked on the state itself, in-process);
- on 2 processes (DeepSpeed ZeRO-0 and ZeRO-2) a skipped step is skipped on every rank.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distq.checkpoint import CheckpointStore
from distq.checkpoint.finite import nonfinite_entries
from distq.config.schema import DistConfig, TrainConfig
from distq.data.order import BatchLayout
from distq.distributed import TeamModule, build_engine
from distq.distributed.env import DistEnv
from distq.train.checkpointing import Checkpointing
from distq.train.faults import VARIABLE as NAN_BATCH
from distq.train.nonfinite import NonFiniteGuard, NonFiniteTraining

STOPPED = 4


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distq: error: "), proc.stderr
    return lines[0]


def skipped_steps(run_dir) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    if "train/skipped_steps" not in events.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in events.Scalars("train/skipped_steps")]


def test_a_diverging_learning_rate_stops_within_the_first_epoch_without_a_checkpoint(tmp_path, tiny_args, run_distq):
    run_dir = tmp_path / "run"
    proc = run_distq(*tiny_args(run_dir, "train.lr=1e6", "train.warmup_epochs=0"))
    assert proc.returncode == STOPPED, proc.stderr
    line = one_error_line(proc)
    assert line.startswith("distq: error: epoch 1, step ")
    assert "is not finite: the run diverged and stopped (train.on_nonfinite=stop)" in line
    assert "lower train.lr" in line
    assert not list(run_dir.glob("checkpoints/step_*"))
    assert "epoch 1/2" not in proc.stdout  # stopped before the end of the first epoch


def test_a_nan_batch_after_a_checkpoint_leaves_the_last_good_one_untouched(tmp_path, tiny_args, run_distq, steps_committed):
    run_dir = tmp_path / "run"
    proc = run_distq(*tiny_args(run_dir, "log.tensorboard=false", "run.save_every_steps=3"), env={NAN_BATCH: "15"})
    assert proc.returncode == STOPPED, proc.stderr
    assert one_error_line(proc).startswith("distq: error: epoch 2, step 15: the training loss is not finite")
    assert steps_committed(run_dir) == [11, 12]  # step 15's checkpoint (run.save_every_steps=3) never written
    assert CheckpointStore(run_dir).find().manifest.step == 12  # the last good one, complete and verified


def test_skip_counts_exactly_one_skipped_step_and_saves_only_finite_tensors(tmp_path, tiny_args, run_distq, checkpoint_of):
    run_dir = tmp_path / "run"
    proc = run_distq(*tiny_args(run_dir, "train.on_nonfinite=skip"), env={NAN_BATCH: "5"})
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1, step 5: non-finite loss or gradients: step skipped (1 so far, 1 in a row)" in proc.stdout.splitlines()
    assert skipped_steps(run_dir) == [(5, 1.0)]
    state = checkpoint_of(run_dir)
    assert state["step"] == 22 and state["skipped_steps"] == 1
    assert nonfinite_entries(state["models"]) == [] and nonfinite_entries(state["optimizer"]) == []
    assert len([k for k in state["models"]["model"] if k.endswith("running_mean")]) > 10  # the statistics were checked too


def test_skip_stops_after_max_skipped_steps_in_a_row(tmp_path, tiny_args, run_distq):
    run_dir = tmp_path / "run"
    proc = run_distq(*tiny_args(run_dir, "train.lr=1e6", "train.warmup_epochs=0", "train.on_nonfinite=skip", "train.max_skipped_steps=3"))
    assert proc.returncode == STOPPED, proc.stderr
    assert "3 steps in a row were not finite (train.max_skipped_steps=3" in one_error_line(proc)
    assert not list(run_dir.glob("checkpoints/step_*"))


def test_a_state_with_a_nan_is_never_checkpointed(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for group in optimizer.param_groups:
        group.update(base_lr=0.1, model="model")
    engine = build_engine(TeamModule(nn.ModuleDict({"model": model}), nn.ModuleDict()), optimizer, TrainConfig(epochs=1), DistConfig(), BatchLayout(2, 1, 1), DistEnv())
    model(torch.randn(2, 4)).sum().backward()
    assert engine.step(True) > 0
    checkpoints = Checkpointing(tmp_path, keep=2)
    meta = {"step": 1, "epoch": 0, "epoch_step": 1, "global_batch": 2}
    checkpoints.save(engine, {"models": {"model": model.state_dict()}}, meta, 0.5)
    assert checkpoints.store.find().manifest.step == 1
    with torch.no_grad():
        model[1].running_var[1] = math.inf
    with pytest.raises(NonFiniteTraining, match=r"checkpoint step_00000002 not written: 1 tensor holds NaN or infinite values \(models.model.1.running_var\)"):
        checkpoints.save(engine, {"models": {"model": model.state_dict()}}, {**meta, "step": 2}, 1.0)
    assert not (tmp_path / "checkpoints" / "step_00000002").exists()
    assert checkpoints.store.find().manifest.step == 1


def test_the_guard_restores_batch_norm_statistics_of_a_skipped_step():
    bn = nn.BatchNorm1d(3)
    guard = NonFiniteGuard(TrainConfig(epochs=1, on_nonfinite="skip"), list(bn.buffers()))
    before = bn.running_mean.clone()
    guard.start_step()
    loss = bn(torch.full((4, 3), math.nan)).sum()
    guard.add_loss(loss)
    assert torch.isnan(bn.running_mean).all()
    assert guard.end_step(1, 1, None, any_rank=lambda flag: flag) is False
    assert torch.equal(bn.running_mean, before) and guard.skipped == 1
    guard.start_step()
    guard.add_loss(bn(torch.ones(4, 3)).sum())
    assert guard.end_step(1, 2, 1.0, any_rank=lambda flag: flag) is True and guard.in_a_row == 0


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_two_processes_skip_the_same_step_on_every_rank(tmp_path, torchrun, checkpoint_of, zero_stage):
    run_dir = tmp_path / "run"
    args = ("train", "configs/digits_w4a4.yaml", "model.width=4", "data.batch_size=64", "data.workers=0", "train.epochs=2",
            "log.progress=false", f"dist.zero_stage={zero_stage}", "train.on_nonfinite=skip", f"run.dir={run_dir}")  # fmt: skip
    log = tmp_path / "log"
    assert torchrun(2, *args, log=log, env={NAN_BATCH: "4"}) == 0, log.read_text()[-3000:]
    assert skipped_steps(run_dir) == [(4, 1.0)]
    state = checkpoint_of(run_dir)
    assert nonfinite_entries(state["models"]) == [] and nonfinite_entries(state["optimizer"]) == []
