"""The training loop: ``fit()`` -> ``train_epoch()`` -> ``train_step()``.

One process here; the distributed engine plugs in behind the same calls. Every source of
randomness after start-up is a function of (seed, epoch) or (seed, step), so a run
resumed from an epoch checkpoint reproduces the uninterrupted run bit for bit.
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
from distq.errors import DistqError
from distq.quant.layers import QAct, quant_layers
from distq.train.checkpoint import atomic_write, find_resume, load_checkpoint, load_weights, save_checkpoint
from distq.train.metrics import topk_correct
from distq.train.optim import build_optimizer, param_groups, set_lr
from distq.train.schedule import lr_factor
from distq.train.tb import ScalarLog
from distq.train.team import FeatureTap, build_objective, build_team, main_model_name, students_of

AUX_GROUP = "aux:"


def evaluate(model: nn.Module, loader) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean loss of ``model`` over ``loader``."""
    model.eval()
    counts = torch.zeros(2, dtype=torch.long)
    loss_sum = torch.zeros((), dtype=torch.float64)
    seen = 0
    with torch.inference_mode():
        for images, labels in loader:
            logits = model(images)
            counts += topk_correct(logits, labels)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            seen += labels.numel()
    model.train()
    if seen == 0:
        raise DistqError("the validation split is empty: put images in ROOT/val/<class>/")
    return {"top1": 100.0 * counts[0].item() / seen, "top5": 100.0 * counts[1].item() / seen, "loss": loss_sum.item() / seen}


class Trainer:
    def __init__(self, cfg: DistqConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        torch.manual_seed(cfg.seed)
        self.data = build_loaders(cfg.data, cfg.seed)
        self.steps_per_epoch = len(self.data.train)
        if self.steps_per_epoch == 0:
            raise DistqError(
                f"data.batch_size={cfg.data.batch_size} is larger than the training set "
                f"({len(self.data.train.dataset)} images): lower data.batch_size"
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
        self.optimizer = build_optimizer(groups, cfg.train)
        self.epoch = 0  # completed epochs
        self.step = 0  # completed optimizer steps
        self.history: list[dict] = []
        self.log: ScalarLog | None = None

    # --- state ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "config": to_dict(self.cfg),
            "classes": self.data.classes,
            "epoch": self.epoch,
            "step": self.step,
            "models": {name: m.state_dict() for name, m in self.models.items()},
            "controller": self.controller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
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
        for name, model in self.models.items():
            load_weights(model, state["models"][name], source)
        self.controller.load_state_dict(state["controller"])
        if self.controller.aux_removed:
            self.drop_aux_groups()
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history = list(state["history"])

    def resume(self, resume: str | None) -> None:
        """``resume`` is None (fresh), ``"auto"`` (latest checkpoint of run.dir if any) or a path."""
        if resume is None:
            return
        path = find_resume(self.run_dir) if resume == "auto" else Path(resume)
        if path is None:
            return
        self.load_state_dict(load_checkpoint(path), f"checkpoint {str(path)!r}")
        print(f"resumed from {path} at epoch {self.epoch}, step {self.step}", flush=True)

    def drop_aux_groups(self) -> None:
        """The auxiliary branches are gone: their parameters leave the optimizer too."""
        groups = self.optimizer.param_groups
        for group in groups:
            if str(group["model"]).startswith(AUX_GROUP):
                for param in group["params"]:
                    self.optimizer.state.pop(param, None)
        self.optimizer.param_groups = [g for g in groups if not str(g["model"]).startswith(AUX_GROUP)]

    # --- loop -------------------------------------------------------------------------

    def fit(self, resume: str | None = None) -> dict:
        self.resume(resume)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        self.log = ScalarLog(self.run_dir, self.cfg.log.tensorboard, purge_step=self.step or None)
        start = time.perf_counter()
        try:
            for epoch in range(self.epoch, self.cfg.train.epochs):
                self.train_epoch(epoch)
                self.controller.on_event(Event.EPOCH_END, self.step)
                metrics = {name: evaluate(m, self.data.val) for name, m in self.models.items()}
                self.end_epoch(epoch, metrics, time.perf_counter() - start)
        finally:
            self.log.close()
        return self.write_results(time.perf_counter() - start)

    def train_epoch(self, epoch: int) -> None:
        torch.manual_seed(epoch_seed(self.cfg.seed, epoch))
        self.data.start_epoch(self.cfg.seed, epoch)
        for model in self.models.values():
            model.train()
        bar = tqdm(
            self.data.train,
            desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}",
            disable=not self.cfg.log.progress,
            leave=False,
            dynamic_ncols=True,
        )
        running = {name: torch.zeros(()) for name in self.models}
        every = self.cfg.log.every_steps
        for i, (images, labels) in enumerate(bar):
            factor = lr_factor(self.step, self.steps_per_epoch, self.cfg.train)
            set_lr(self.optimizer, factor)
            self.controller.on_event(Event.BATCH_START, self.step, on_aux_removed=self.drop_aux_groups)
            losses = self.train_step(images, labels)
            self.controller.on_event(Event.AFTER_STEP, self.step)
            for name, loss in losses.items():
                running[name] += loss
            self.step += 1
            if self.step % every == 0 or i == self.steps_per_epoch - 1:
                window = i % every + 1
                values = {name: r.item() / window for name, r in running.items()}
                for r in running.values():
                    r.zero_()
                self.log.scalar("train/loss", values[self.main], self.step)
                if len(values) > 1:
                    self.log.scalars({f"train/loss/{name}": v for name, v in values.items()}, self.step)
                self.log.scalar("lr", self.cfg.train.lr * factor, self.step)
                self.log.scalars(self.controller.scalars(), self.step)
                bar.set_postfix(loss=f"{values[self.main]:.3f}")

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimizer step of every model on the same batch; returns each model's loss."""
        self.optimizer.zero_grad(set_to_none=True)
        logits = {name: model(images) for name, model in self.models.items()}
        losses = self.objective(logits, labels, self.tap.features if self.tap else None)
        torch.stack(list(losses.values())).sum().backward()
        if self.cfg.train.grad_clip is not None:
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], self.cfg.train.grad_clip)
        self.optimizer.step()
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
        self.log.flush()
        record = {"epoch": self.epoch, "step": self.step, **{f"val/{k}": v for k, v in main.items()}}
        if len(metrics) > 1:
            record["models"] = {name: {"val/top1": m["top1"], "val/top5": m["top5"]} for name, m in metrics.items()}
        self.history.append(record)
        save_checkpoint(self.state_dict(), self.run_dir, self.epoch, self.cfg.run.keep_checkpoints)
        parts = [f"epoch {self.epoch}/{self.cfg.train.epochs}", f"val top1 {main['top1']:.2f}", f"top5 {main['top5']:.2f}", f"loss {main['loss']:.4f}"]
        parts += [f"{name} top1 {m['top1']:.2f}" for name, m in metrics.items() if name != self.main]
        print("  ".join(parts) + f"  ({elapsed:.0f}s)", flush=True)

    def write_results(self, wall_time: float) -> dict:
        last = self.history[-1] if self.history else {}
        results = {
            "val/top1": last.get("val/top1"),
            "val/top5": last.get("val/top5"),
            "epochs": self.epoch,
            "steps": self.step,
            "wall_time_s": round(wall_time, 2),
        }
        if "models" in last:
            results["models"] = last["models"]
        text = json.dumps(results, indent=2) + "\n"
        atomic_write(self.run_dir / "results.json", lambda f: f.write(text.encode()))
        return results
