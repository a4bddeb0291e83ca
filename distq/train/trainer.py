"""The training loop: ``fit()`` -> ``train_epoch()`` -> ``train_step()``.

One process here; the distributed engine plugs in behind the same calls. Every source of
randomness after start-up is a function of (seed, epoch), so a run resumed from an
epoch checkpoint reproduces the uninterrupted run bit for bit.
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
from distq.data import build_loaders
from distq.data.loaders import epoch_seed
from distq.errors import DistqError
from distq.models.build import build_model
from distq.quant.layers import QAct, quant_layers
from distq.train.checkpoint import atomic_write, find_resume, load_checkpoint, load_weights, save_checkpoint
from distq.train.metrics import topk_correct
from distq.train.optim import build_optimizer, param_groups, set_lr
from distq.train.schedule import lr_factor
from distq.train.tb import ScalarLog

MAIN_MODEL = "model"


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
        self.models = nn.ModuleDict({MAIN_MODEL: build_model(cfg.model, cfg.quant, len(self.data.classes))})
        groups = [g for name, m in self.models.items() for g in param_groups(m, cfg.train.lr, cfg.train.weight_decay, name)]
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
        for name, model in self.models.items():
            load_weights(model, state["models"][name], source)
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
        print(f"resumed from {path} at epoch {self.epoch}, step {self.step}")

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
        running = torch.zeros(())
        for i, (images, labels) in enumerate(bar):
            factor = lr_factor(self.step, self.steps_per_epoch, self.cfg.train)
            set_lr(self.optimizer, factor)
            loss = self.train_step(images, labels)
            running += loss
            self.step += 1
            if self.step % self.cfg.log.every_steps == 0 or i == self.steps_per_epoch - 1:
                value = running.item() / (i % self.cfg.log.every_steps + 1)
                running.zero_()
                self.log.scalar("train/loss", value, self.step)
                self.log.scalar("lr", self.cfg.train.lr * factor, self.step)
                bar.set_postfix(loss=f"{value:.3f}")

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.models[MAIN_MODEL](images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.train.label_smoothing)
        loss.backward()
        if self.cfg.train.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.models.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        return loss.detach()

    def end_epoch(self, epoch: int, metrics: dict[str, dict], elapsed: float) -> None:
        self.epoch = epoch + 1
        main = metrics[MAIN_MODEL]
        self.log.scalars({"val/top1": main["top1"], "val/top5": main["top5"], "val/loss": main["loss"]}, self.step)
        for name, model in self.models.items():
            for layer_name, layer in quant_layers(model):
                kind = "a" if isinstance(layer, QAct) else "w"
                self.log.scalar(f"bits/{kind}/{layer_name}", layer.bits, self.step)
        self.log.flush()
        self.history.append({"epoch": self.epoch, "step": self.step, **{f"val/{k}": v for k, v in main.items()}})
        save_checkpoint(self.state_dict(), self.run_dir, self.epoch, self.cfg.run.keep_checkpoints)
        print(
            f"epoch {self.epoch}/{self.cfg.train.epochs}  val top1 {main['top1']:.2f}  top5 {main['top5']:.2f}  "
            f"loss {main['loss']:.4f}  ({elapsed:.0f}s)",
            flush=True,
        )

    def write_results(self, wall_time: float) -> dict:
        last = self.history[-1] if self.history else {}
        results = {
            "val/top1": last.get("val/top1"),
            "val/top5": last.get("val/top5"),
            "epochs": self.epoch,
            "steps": self.step,
            "wall_time_s": round(wall_time, 2),
        }
        text = json.dumps(results, indent=2) + "\n"
        atomic_write(self.run_dir / "results.json", lambda f: f.write(text.encode()))
        return results
