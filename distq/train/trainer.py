"""The training loop: ``fit()`` -> ``train_epoch()`` -> ``train_step()``.

Processes and devices are the engine's business (``distq.dist``); this loop is the same
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
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from distq.config import DistqConfig, config_from_dict, to_dict
from distq.controller.controller import PrecisionController
from distq.controller.policies import Event
from distq.controller.timeline import Clock
from distq.data import build_loaders
from distq.data.loaders import epoch_seed
from distq.dist import TeamModule, build_engine, detect
from distq.dist.engine import TorchEngine
from distq.dist.vote import RankVote
from distq.errors import DistqError
from distq.quant.layers import QAct, fixed_quantized_weights, quant_layers
from distq.train.checkpoint import atomic_write, find_resume, load_checkpoint, load_weights, save_checkpoint
from distq.train.metrics import topk_correct
from distq.train.optim import build_optimizer, param_groups, set_lr
from distq.train.preemption import Preempted, PreemptionFlag
from distq.train.schedule import lr_factor
from distq.train.tb import ScalarLog
from distq.train.team import FeatureTap, build_objective, build_team, main_model_name, students_of

AUX_GROUP = "aux:"
MEASURED_KEYS = ("wall_time_s", "train_images_per_s", "max_memory_gib")
"""Keys of results.json that are timings or memory, not results: they differ from run to run."""


def evaluate_counts(model: nn.Module, loader, device: torch.device) -> torch.Tensor:
    """``[top-1 hits, top-5 hits, summed loss, images]`` of ``model`` over ``loader``
    (counts, so the shards of several ranks add up exactly)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    with torch.inference_mode(), fixed_quantized_weights(model):  # the weights are quantized once, not per batch
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = model(images.to(next(model.parameters()).dtype)).float()
            hits = topk_correct(logits, labels).double()
            loss = F.cross_entropy(logits, labels, reduction="sum").double()
            totals += torch.stack([hits[0], hits[1], loss, torch.full((), labels.numel(), device=device, dtype=torch.float64)])
    model.train(was_training)
    return totals


def metrics_from_counts(totals: torch.Tensor) -> dict[str, float]:
    top1, top5, loss, seen = totals.tolist()
    if seen == 0:
        raise DistqError("the validation split is empty: put images in ROOT/val/<class>/")
    return {"top1": 100.0 * top1 / seen, "top5": 100.0 * top5 / seen, "loss": loss / seen}


def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu") -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean loss of ``model`` over ``loader``."""
    return metrics_from_counts(evaluate_counts(model, loader, torch.device(device)))


class Trainer:
    def __init__(self, cfg: DistqConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.env = detect()
        torch.manual_seed(cfg.seed)
        self.data = build_loaders(cfg.data, cfg.seed, self.env.rank, self.env.world)
        self.micro_batches = len(self.data.train)
        self.steps_per_epoch = self.micro_batches // cfg.dist.grad_accum
        if self.steps_per_epoch == 0:
            raise DistqError(
                f"data.batch_size={cfg.data.batch_size} x dist.grad_accum={cfg.dist.grad_accum} x {self.env.world} process(es) "
                f"is larger than the training set: lower data.batch_size"
            )
        self.clock = Clock(self.steps_per_epoch, self.steps_per_epoch * cfg.train.epochs)
        self.team = build_team(cfg, len(self.data.classes))
        self.models = nn.ModuleDict({m.name: m.model for m in self.team})
        self.main = main_model_name(self.team)
        self.objective = build_objective(cfg, self.team)
        self.tap = FeatureTap(self.team, cfg.guided.hint.layer) if cfg.guided and cfg.guided.hint else None
        self.controller = PrecisionController(cfg, self.clock, students_of(self.team))
        groups = [g for m in self.team for g in param_groups(m.model, m.lr, cfg.train.weight_decay, m.name)]
        for name, params in self.controller.aux_parameters().items():
            groups.append({"params": params, "weight_decay": cfg.train.weight_decay, "base_lr": cfg.train.lr, "model": AUX_GROUP + name})
        extra = nn.ModuleDict(self.controller.aux)
        self.engine = build_engine(TeamModule(self.models, extra), build_optimizer(groups, cfg.train), cfg.train, cfg.dist, cfg.data.batch_size, self.env)
        self.epoch = 0  # completed epochs
        self.batch = 0  # micro-batches done in the current epoch (mid-epoch checkpoints)
        self.step = 0  # completed optimizer steps
        self.history: list[dict] = []
        self.log: ScalarLog | None = None
        self.preemption = PreemptionFlag()
        self.speed = 0.0  # training images/s of the last epoch, all ranks together
        self.stop_vote = RankVote(self.env, cfg.dist.timeout_s)  # all ranks stop at the same step

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def say(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    # --- state ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "config": to_dict(self.cfg),
            "classes": self.data.classes,
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "world_size": self.env.world,
            "models": {name: m.state_dict() for name, m in self.models.items()},
            "controller": self.controller.state_dict(),
            "optimizer": self.engine.optimizer_state(),
            "rng": torch.get_rng_state(),
            "history": self.history,
        }

    def load_state_dict(self, state: dict, source: str) -> None:
        saved = config_from_dict(state["config"])
        if (saved.model, saved.data.image_size) != (self.cfg.model, self.cfg.data.image_size) or state["classes"] != self.data.classes:
            raise DistqError(
                f"{source} was written for a different model or dataset "
                f"(model.arch={saved.model.arch}, width={saved.model.width}, {len(state['classes'])} classes): "
                f"use a fresh run.dir or the same config"
            )
        if set(state["models"]) != set(self.models):
            raise DistqError(f"{source} holds models {sorted(state['models'])}, this config trains {sorted(self.models)}: use the same config")
        if state.get("batch", 0) and state.get("world_size", 1) != self.env.world:
            raise DistqError(f"{source} stopped mid-epoch with {state['world_size']} processes: resume it with the same number of processes")
        for name, model in self.models.items():
            load_weights(model, state["models"][name], source)
        self.controller.load_state_dict(state["controller"])
        if self.controller.aux_removed:
            self.drop_aux_groups()
        self.engine.load_optimizer_state(state["optimizer"], self.run_dir)
        self.epoch, self.batch, self.step = state["epoch"], state.get("batch", 0), state["step"]
        self.history = list(state["history"])
        if self.batch:
            torch.set_rng_state(state["rng"])

    def resume(self, resume: str | None) -> None:
        """``resume`` is None (fresh), ``"auto"`` (latest checkpoint of run.dir if any) or a path."""
        if resume is None:
            return
        path = find_resume(self.run_dir) if resume == "auto" else Path(resume)
        if path is None:
            return
        self.load_state_dict(load_checkpoint(path), f"checkpoint {str(path)!r}")
        where = f"epoch {self.epoch}" + (f", batch {self.batch}" if self.batch else "")
        self.say(f"resumed from {path} at {where}, step {self.step}")

    def drop_aux_groups(self) -> None:
        """The auxiliary branches are gone: their parameters leave the optimizer too.
        (Under DeepSpeed the flat optimizer keeps them; they get no gradient and are unused.)"""
        if not isinstance(self.engine, TorchEngine):
            return
        optimizer = self.engine.optimizer
        for group in optimizer.param_groups:
            if str(group["model"]).startswith(AUX_GROUP):
                for param in group["params"]:
                    optimizer.state.pop(param, None)
        optimizer.param_groups = [g for g in optimizer.param_groups if not str(g["model"]).startswith(AUX_GROUP)]

    def save(self) -> None:
        tag = f"epoch_{self.epoch:04d}" + (f"_batch_{self.batch:06d}" if self.batch else "")
        self.engine.save_sharded(self.run_dir, tag, self.cfg.run.keep_checkpoints)
        if self.is_main:
            save_checkpoint(self.state_dict(), self.run_dir, self.epoch, 0 if self.batch else self.cfg.run.keep_checkpoints)
        self.engine.barrier()

    # --- loop -------------------------------------------------------------------------

    def fit(self, resume: str | None = None) -> dict:
        self.resume(resume)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        self.log = ScalarLog(self.run_dir, self.cfg.log.tensorboard and self.is_main, purge_step=self.step or None)
        start = time.perf_counter()
        try:
            for epoch in range(self.epoch, self.cfg.train.epochs):
                self.train_epoch(epoch)
                self.engine.broadcast_buffers()
                self.controller.on_event(Event.EPOCH_END, self.step)
                metrics = {name: self.evaluate(m) for name, m in self.models.items()}
                self.end_epoch(epoch, metrics, time.perf_counter() - start)
            self.stop_vote.outcome()  # the last step's vote: the run is complete either way
        finally:
            self.log.close()
        return self.write_results(time.perf_counter() - start)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        totals = evaluate_counts(model, self.data.val, self.engine.device)
        return metrics_from_counts(self.engine.all_reduce_sum(totals).cpu())

    def train_epoch(self, epoch: int) -> None:
        if self.batch == 0:
            torch.manual_seed(epoch_seed(self.cfg.seed, epoch))
        self.data.start_epoch(self.cfg.seed, epoch, skip_batches=self.batch)
        self.engine.team.train()
        bar = tqdm(
            self.data.train,
            desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}",
            total=self.micro_batches - self.batch,
            disable=not (self.cfg.log.progress and self.is_main),
            leave=False,
            dynamic_ncols=True,
        )
        accum, every = self.cfg.dist.grad_accum, self.cfg.log.every_steps
        running = {name: torch.zeros((), device=self.engine.device) for name in self.models}
        logged_at = self.step
        started, first_step = time.perf_counter(), self.step
        for i, (images, labels) in enumerate(bar, start=self.batch):
            if i >= self.steps_per_epoch * accum:
                break  # the micro-batches left over by grad_accum are not used
            if i % accum == 0:
                factor = lr_factor(self.step, self.steps_per_epoch, self.cfg.train)
                set_lr(self.engine.optimizer, factor)
                self.controller.on_event(Event.BATCH_START, self.step, on_aux_removed=self.drop_aux_groups)
            boundary = (i + 1) % accum == 0
            losses = self.train_step(images, labels, boundary)
            for name, loss in losses.items():
                running[name] += loss / accum
            self.batch = i + 1
            if not boundary:
                continue
            self.controller.on_event(Event.AFTER_STEP, self.step)
            self.step += 1
            if self.step % every == 0 or self.batch == self.steps_per_epoch * accum:
                values = {name: r.item() / (self.step - logged_at) for name, r in running.items()}
                logged_at = self.step
                for r in running.values():
                    r.zero_()
                self.log.scalar("train/loss", values[self.main], self.step)
                if len(values) > 1:
                    self.log.scalars({f"train/loss/{name}": v for name, v in values.items()}, self.step)
                self.log.scalar("lr", self.cfg.train.lr * factor, self.step)
                self.log.scalars(self.controller.scalars(), self.step)
                bar.set_postfix(loss=f"{values[self.main]:.3f}")
            if self.stop_vote(self.preemption.raised):
                self.save()
                raise Preempted(f"stopped by signal at epoch {epoch + 1}, batch {self.batch}: checkpoint saved, resume with --resume auto")
        bar.close()
        self.batch = 0
        # The epoch's last step read its loss (.item() above), so the device has finished it.
        images = (self.step - first_step) * accum * self.cfg.data.batch_size * self.env.world
        self.speed = images / max(time.perf_counter() - started, 1e-9)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, boundary: bool = True) -> dict[str, torch.Tensor]:
        """Forward and backward of every model on the same micro-batch; the optimizer steps
        on the accumulation boundary. Returns each model's loss."""
        device = self.engine.device
        images = images.to(device, non_blocking=True, memory_format=self.engine.memory_format)
        labels = labels.to(device, non_blocking=True)
        with self.engine.autocast():
            logits = self.engine.forward(images)
            losses = self.objective(logits, labels, self.tap.features if self.tap else None)
        self.engine.backward(torch.stack(list(losses.values())).sum())
        self.engine.step(boundary)
        return {name: loss.detach() for name, loss in losses.items()}

    def end_epoch(self, epoch: int, metrics: dict[str, dict], elapsed: float) -> None:
        self.epoch = epoch + 1
        main = metrics[self.main]
        self.log.scalars({"val/top1": main["top1"], "val/top5": main["top5"], "val/loss": main["loss"]}, self.step)
        if len(metrics) > 1:
            for name, m in metrics.items():
                self.log.scalars({f"val/top1/{name}": m["top1"], f"val/top5/{name}": m["top5"]}, self.step)
        for member in self.team:
            prefix = "bits" if len(self.team) == 1 else f"bits/{member.name}"
            for layer_name, layer in quant_layers(member.model):
                kind = "a" if isinstance(layer, QAct) else "w"
                self.log.scalar(f"{prefix}/{kind}/{layer_name}", layer.bits, self.step)
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
            atomic_write(self.run_dir / "results.json", lambda f: f.write(text.encode()))
        return results
