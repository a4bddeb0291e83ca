"""The training loop: ``fit()`` -> ``train_epoch()`` -> ``train_step()``.

Processes and devices are the engine's business (``distq.distributed``); this loop is the same
for one process and for many. Every source of randomness after start-up is a function of
(seed, epoch, sample) or (seed, step), so a run resumed from a checkpoint, at an epoch
boundary or mid-epoch, reproduces the uninterrupted run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from distq.checkpoint import FORMAT_VERSION, CheckpointError, Found, atomic_write, checkpoint_dir, load_tensors, load_weights
from distq.config import DistqConfig, config_from_dict, to_dict
from distq.controller import Clock, Event
from distq.data import build_loaders
from distq.data.bundle import epoch_seed
from distq.data.order import configured_layout
from distq.distributed import detect
from distq.distributed.engine import gather_objects, join_process_group
from distq.errors import DistqError, SaidByRankZero
from distq.models.evaluation import metrics_from_counts, model_counts
from distq.progress import Progress
from distq.quant.calibrate import needs_calibration
from distq.quant.functional import FULL_PRECISION
from distq.quant.layers import QAct, quant_layers
from distq.train import run_dir
from distq.train.checkpointing import Checkpointing, resume_layout
from distq.train.faults import TrainingFaults
from distq.train.nonfinite import NonFiniteGuard
from distq.train.preemption import Preempted, PreemptionFlag
from distq.train.resume_config import config_changes
from distq.train.run_lock import RunLock
from distq.train.sample_log import SampleLog, next_start
from distq.train.schedule import lr_factor
from distq.train.step import AUX_GROUP, build_step
from distq.train.tb import ScalarLog

MEASURED_KEYS = ("wall_time_s", "train_images_per_s", "max_memory_gib")
"""Keys of results.json that are timings or memory, not results: they differ from run to run."""


class Trainer:
    def __init__(self, cfg: DistqConfig, resume: str | None = None, overwrite: bool = False):
        """``resume``: None (fresh), "auto" (the newest complete checkpoint of run.dir, if any), or
        the path of a run directory or checkpoint folder. The checkpoint is chosen first, since
        its global batch decides how this run's processes split the batch. ``overwrite``: start
        over in a run.dir that holds a run, deleting its files first (otherwise refused)."""
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.env = detect()
        if overwrite and resume is not None:
            raise DistqError("--overwrite starts a run over and --resume continues one: pass only one of them")
        self.resume_mode, self.overwrite = resume, overwrite
        self.checkpoints = Checkpointing(self.run_dir, cfg.run.keep_checkpoints)
        join_process_group(cfg.dist, self.env)
        self.lock = RunLock(self.run_dir, cfg.run.lock_stale_s) if self.is_main else None
        self.found: Found | None = self.take_run_dir()
        try:
            self._build()
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        configured = configured_layout(cfg, self.env.world)
        self.layout = configured if self.found is None else resume_layout(self.found, configured, cfg.data.batch_size, cfg.train.global_batch)
        self.data = build_loaders(cfg.data, cfg.seed, self.layout, self.env.rank)
        self.steps_per_epoch = len(self.data.train) // self.layout.grad_accum
        self.clock = Clock(self.steps_per_epoch, self.steps_per_epoch * cfg.train.epochs)
        self.parts = build_step(cfg, len(self.data.classes), self.clock, self.layout, self.env)
        parts = self.parts
        self.team, self.models, self.main, self.controller, self.engine = parts.team, parts.models, parts.main, parts.controller, parts.engine
        self.epoch = 0  # completed epochs
        self.step = 0  # completed optimizer steps (the epoch's own: step - epoch * steps_per_epoch)
        self.history: list[dict] = []
        self.log: ScalarLog | None = None
        self.samples: SampleLog | None = None
        self.preemption = PreemptionFlag()
        self.faults = TrainingFaults()
        self.speed = 0.0  # training images/s of the last epoch, all ranks together
        self.guard = NonFiniteGuard(cfg.train, list(self.engine.team.buffers()))
        parts.on_loss = self.guard.add_loss
        self.wall_time_before = 0.0  # training time of the runs this one resumes
        self.started: float | None = None  # when this process started training (perf_counter)
        self.calibrate_first_batch = self.found is None and needs_calibration(self.models.values())
        """A fresh run whose quantizers learn parameters (LSQ's steps) sets them from its first batch."""

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def say(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    # --- state ------------------------------------------------------------------------

    @property
    def epoch_step(self) -> int:
        """Optimizer steps done in the current epoch (0 at an epoch boundary)."""
        return self.step - self.epoch * self.steps_per_epoch

    def state_dict(self) -> dict:
        """The rank-0 training state (the optimizer's is each rank's shard)."""
        return {
            "format": FORMAT_VERSION,
            "config": to_dict(self.cfg),
            "classes": self.data.classes,
            "epoch": self.epoch,
            "step": self.step,
            "world_size": self.env.world,
            "global_batch": self.layout.global_batch,
            "models": {name: m.state_dict() for name, m in self.models.items()},
            "controller": self.controller.state_dict(),
            "rng": torch.get_rng_state(),
            "history": self.history,
            "skipped_steps": self.guard.skipped,
            "wall_time_s": self.wall_time_before + self.elapsed(),
        }

    def load_state_dict(self, state: dict, source: str) -> None:
        saved = config_from_dict(state["config"])
        if (saved.model, saved.data.image_size) != (self.cfg.model, self.cfg.data.image_size) or state["classes"] != self.data.classes:
            raise CheckpointError(
                f"{source} was written for a different model or dataset "
                f"(model.arch={saved.model.arch}, width={saved.model.width}, {len(state['classes'])} classes): "
                f"use a fresh run.dir or the same config"
            )
        if set(state["models"]) != set(self.models):
            raise CheckpointError(f"{source} holds models {sorted(state['models'])}, this config trains {sorted(self.models)}: use the same config")
        for name, model in self.models.items():
            load_weights(model, state["models"][name], source)
        self.controller.load_state_dict(state["controller"])
        self.engine.weights_changed()
        if self.controller.aux_removed:
            self.engine.freeze_groups(AUX_GROUP)
        self.epoch, self.step = state["epoch"], state["step"]
        self.history = list(state["history"])
        self.guard.skipped = int(state.get("skipped_steps", 0))
        self.wall_time_before = float(state.get("wall_time_s", 0.0))
        if self.epoch_step:
            torch.set_rng_state(state["rng"])

    def resume(self) -> None:
        found = self.found
        if found is None:
            return
        for line in found.skipped:
            self.say(f"checkpoint {line}: passed over")
        source = f"checkpoint {found.folder}"
        state = load_tensors(found.state_path)
        changes = config_changes(state["config"], to_dict(self.cfg))
        if changes.refused:
            raise CheckpointError(
                f"{source} was trained with another config; these keys define the run and must stay as they were: "
                f"{'; '.join(changes.refused)}: resume with the checkpoint's values (RUN_DIR/config.yaml), or start a new run.dir"
            )
        for line in changes.applied:
            self.say(f"config change on resume: {line}")
        self.load_state_dict(state, source)
        self.engine.load_optimizer(found)
        where = f"epoch {self.epoch}, step {self.step}"
        if self.epoch_step:
            where += f" ({self.epoch_step} of {self.steps_per_epoch} steps into epoch {self.epoch + 1})"
        if found.manifest.world_size != self.env.world:
            where += f"; written by {found.manifest.world_size} process(es), now {self.layout.describe()}, global batch {self.layout.global_batch} kept"
        self.say(f"resumed from {found.folder} at {where}")

    def save(self) -> Path:
        meta = {"step": self.step, "epoch": self.epoch, "epoch_step": self.epoch_step, "global_batch": self.layout.global_batch}
        progress = self.step / self.steps_per_epoch
        owner_check = self.lock.check if self.lock is not None else None
        return self.checkpoints.save(self.engine, self.state_dict() if self.is_main else None, meta, progress, owner_check)

    # --- loop -------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train to ``train.epochs``; returns the results. Gives run.dir back at the end."""
        try:
            return self._fit()
        finally:
            if self.lock is not None:
                self.lock.release()

    def take_run_dir(self) -> Found | None:
        """Every rank, first of all: rank 0 takes run.dir's lock, chooses the checkpoint to resume
        and checks that this run may write there (a directory holding another run is refused
        without --resume or --overwrite); every rank raises the same error if not, or chooses
        the same checkpoint. Nothing is written to run.dir before this."""
        error, found = None, None
        if self.is_main:
            try:
                run_dir.prepare(self.run_dir)
                self.lock.acquire()
                for line in self.lock.notes:
                    self.say(line)
                found = self.checkpoints.find(self.resume_mode)
                self._check_run_dir(found)
            except DistqError as exc:
                self.lock.release()
                error = exc
        message = gather_objects(None if error is None else str(error), self.env)[0]
        if message is not None:
            if error is not None:
                raise error
            raise SaidByRankZero(message)
        return found if self.is_main else self.checkpoints.find(self.resume_mode)

    def _check_run_dir(self, found: Found | None) -> None:
        resuming_here = found is not None and found.folder.parent.resolve() == checkpoint_dir(self.run_dir).resolve()
        if resuming_here or not run_dir.holds_run(self.run_dir):
            return
        if self.overwrite:
            deleted = run_dir.clear(self.run_dir)
            self.say(f"run.dir {self.run_dir}: --overwrite deleted the earlier run's {', '.join(deleted)}")
            return
        if self.resume_mode == "auto" and found is None and not (self.run_dir / run_dir.RESULTS).exists():
            deleted = run_dir.clear(self.run_dir)  # an attempt that died before its first checkpoint
            self.say(f"run.dir {self.run_dir} has no checkpoint to resume: starting afresh (deleted {', '.join(deleted)} of an attempt that saved none)")
            return
        raise run_dir.refusal(self.run_dir)

    def _fit(self) -> dict:
        self.resume()
        if self.epoch >= self.cfg.train.epochs and self.found is not None:
            self.say(
                f"run.dir {self.run_dir} is finished (epoch {self.epoch} of train.epochs={self.cfg.train.epochs}): nothing to train; "
                f"train.epochs={self.epoch + 1} or more extends it"
            )
            return self.existing_results()
        if self.is_main:
            config_file = self.run_dir / run_dir.CONFIG
            if config_file.exists():  # a resume: the run's original config stays as it was
                config_file = run_dir.next_resumed_config(self.run_dir)
            config_file.write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
            if self.layout != configured_layout(self.cfg, self.env.world) or self.cfg.train.global_batch is not None:
                self.say(f"global batch {self.layout.global_batch}: {self.layout.describe()}")
        self.log = ScalarLog(self.run_dir, self.cfg.log.tensorboard and self.is_main, purge_step=self.step or None)
        start_number = self.engine.gather_objects(next_start(self.run_dir) if self.is_main else None)[0]
        self.samples = SampleLog(self.run_dir, start_number, self.step, self.env.rank, self.cfg.log.samples)
        self.started = start = time.perf_counter()
        try:
            self.controller.on_event(Event.FIT_START, self.step)
            for epoch in range(self.epoch, self.cfg.train.epochs):
                self.controller.on_event(Event.EPOCH_START, self.step)
                self.train_epoch(epoch)
                self.engine.broadcast_buffers()
                self.controller.on_event(Event.EPOCH_END, self.step)
                metrics = {name: self.evaluate(m) for name, m in self.models.items()}
                self.end_epoch(epoch, metrics, time.perf_counter() - start)
            self.engine.vote.outcome()  # the last step's vote: the run is complete either way
            self.controller.on_event(Event.FIT_END, self.step)
        finally:
            self.log.close()
            self.samples.close()
        return self.write_results(self.wall_time_before + time.perf_counter() - start)

    def elapsed(self) -> float:
        """Seconds this process has trained (0 before fit)."""
        return 0.0 if self.started is None else time.perf_counter() - self.started

    def existing_results(self) -> dict:
        try:
            return json.loads((self.run_dir / run_dir.RESULTS).read_text())
        except (OSError, ValueError):
            return {"epochs": self.epoch, "steps": self.step}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        totals = model_counts(model, self.data.val, self.engine.device)
        return metrics_from_counts(self.engine.all_reduce_sum(totals).cpu())

    def train_epoch(self, epoch: int) -> None:
        first_step = self.epoch_step
        if first_step == 0:
            torch.manual_seed(epoch_seed(self.cfg.seed, epoch))
        self.data.start_epoch(epoch, first_step)
        self.engine.team.train()
        accum, every = self.layout.grad_accum, self.cfg.log.every_steps
        # A bar on a terminal; in a log file (SLURM), one plain line each time the loss is logged.
        bar = Progress(
            self.steps_per_epoch,
            f"epoch {epoch + 1}/{self.cfg.train.epochs}",
            every=every,
            unit="step",
            initial=first_step,
            enabled=self.cfg.log.progress and self.is_main,
            leave=False,
        )
        running = {name: torch.zeros((), device=self.engine.device) for name in self.models}
        logged_at = started_at = self.step
        started = time.perf_counter()
        save_every = self.cfg.run.save_every_steps
        for i, (images, labels, indices) in enumerate(self.data.train):
            if i % accum == 0:
                factor = lr_factor(self.step, self.steps_per_epoch, self.cfg.train)
                self.engine.set_lr(factor)
                self.parts.start(self.step)
                self.guard.start_step()
            self.samples.write(epoch, self.step, indices)
            if self.calibrate_first_batch:
                self.calibrate(images)
            boundary = (i + 1) % accum == 0
            images = self.faults.batch(images, self.step)
            losses = self.train_step(images, labels, boundary)
            for name, loss in losses.items():
                running[name] += torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) / accum
            if not boundary:
                continue
            if not self.guard.end_step(epoch + 1, self.step + 1, self.parts.grad_norm, self.engine.any_rank):
                self.log.scalar("train/skipped_steps", self.guard.skipped, self.step + 1)
                self.say(
                    f"epoch {epoch + 1}, step {self.step + 1}: non-finite loss or gradients: step skipped "
                    f"({self.guard.skipped} so far, {self.guard.in_a_row} in a row)"
                )
            self.parts.finish(self.step)
            self.step += 1
            loss_logged = self.step % every == 0 or self.epoch_step == self.steps_per_epoch
            if loss_logged:
                values = {name: r.item() / (self.step - logged_at) for name, r in running.items()}
                logged_at = self.step
                for r in running.values():
                    r.zero_()
                self.log.scalar("train/loss", values[self.main], self.step)
                if len(values) > 1:
                    for name, v in values.items():
                        self.log.model_scalars(name, {"train/loss": v}, self.step)
                self.log.scalar("lr", self.cfg.train.lr * factor, self.step)
                self.log.scalars(self.controller.scalars(), self.step)
                bar.set_postfix(loss=f"{values[self.main]:.3f}")
            bar.update(line=loss_logged)  # plain lines (no terminal) carry the loss just logged
            if self.engine.should_stop(self.preemption.raised):
                self.save()
                raise Preempted(
                    f"stopped by signal at epoch {epoch + 1}, step {self.step} ({self.epoch_step} of {self.steps_per_epoch} in the epoch): "
                    "checkpoint saved, resume with --resume auto"
                )
            if save_every and self.step % save_every == 0 and self.epoch_step < self.steps_per_epoch:
                self.save()
        bar.close()
        # The epoch's last step read its loss (.item() above), so the device has finished it.
        images = (self.step - started_at) * self.layout.global_batch
        self.speed = images / max(time.perf_counter() - started, 1e-9)

    def calibrate(self, images: torch.Tensor) -> None:
        count = self.parts.calibrate(images)
        self.calibrate_first_batch = False
        self.say(f"quantizer parameters of {count} layers initialised from the first training batch")

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, boundary: bool = True) -> dict[str, torch.Tensor]:
        """One micro-batch of the step (``distq.train.step.TrainStep``)."""
        return self.parts(images, labels, boundary)

    def end_epoch(self, epoch: int, metrics: dict[str, dict], elapsed: float) -> None:
        self.epoch = epoch + 1
        main = metrics[self.main]
        self.log.scalars({"val/top1": main["top1"], "val/top5": main["top5"], "val/loss": main["loss"]}, self.step)
        if len(metrics) > 1:
            for name, m in metrics.items():
                self.log.model_scalars(name, {"val/top1": m["top1"], "val/top5": m["top5"], "val/loss": m["loss"]}, self.step)
        for member in self.team:
            layers = [(name, layer) for name, layer in quant_layers(member.model)]
            if any(layer.bits != FULL_PRECISION for _, layer in layers):  # a full-precision guide has no table
                rows = [(name, "activation" if isinstance(layer, QAct) else "weight", str(layer.bits), layer.method) for name, layer in layers]
                self.log.table_if_changed(f"bits/{member.name}", rows, ("layer", "quantizes", "bits", "method"), self.step)
        perf = self.perf()
        self.log.scalars({f"perf/{k}": v for k, v in perf.items()}, self.step)
        self.log.flush()
        record = {"epoch": self.epoch, "step": self.step, **{f"val/{k}": v for k, v in main.items()}}
        if len(metrics) > 1:
            record["models"] = {name: {"val/top1": m["top1"], "val/top5": m["top5"]} for name, m in metrics.items()}
        self.history.append(record)
        self.save()
        parts = [f"epoch {self.epoch}/{self.cfg.train.epochs}", f"val top1 {main['top1']:.2f}", f"top5 {main['top5']:.2f}", f"loss {main['loss']:.4f}"]
        parts += [f"{name} top1 {m['top1']:.2f}" for name, m in metrics.items() if name != self.main]
        memory = f", {perf['max_memory_gib']:.1f} GiB" if "max_memory_gib" in perf else ""
        self.say("  ".join(parts) + f"  ({elapsed:.0f}s, {perf['train_images_per_s']:.0f} img/s{memory})")

    def perf(self) -> dict[str, float]:
        """Training speed of the last epoch (images/s over all ranks) and, on a GPU, rank 0's
        peak memory. Measurements, so kept out of the reproducible history."""
        perf = {"train_images_per_s": round(self.speed, 1)}
        if self.engine.device.type == "cuda":
            perf["max_memory_gib"] = round(torch.cuda.max_memory_allocated(self.engine.device) / 2**30, 2)
        return perf

    def write_results(self, wall_time: float) -> dict:
        last = self.history[-1] if self.history else {}
        results = {
            "val/top1": last.get("val/top1"),
            "val/top5": last.get("val/top5"),
            "epochs": self.epoch,
            "steps": self.step,
            "world_size": self.env.world,
            "wall_time_s": round(wall_time, 2),
            **self.perf(),
        }
        if "models" in last:
            results["models"] = last["models"]
        if self.is_main:
            text = json.dumps(results, indent=2) + "\n"
            atomic_write(self.run_dir / run_dir.RESULTS, lambda f: f.write(text.encode()))
        return results
