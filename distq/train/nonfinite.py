"""Non-finite training stops, loudly, and never reaches a checkpoint.

Every optimizer step the loop asks the guard whether the step was finite: the loss of each
micro-batch (on every rank, agreed by one small all-reduce) and the gradient norm the engine
measured before updating (an engine never applies a non-finite gradient: see
``Engine.step``). ``train.on_nonfinite: stop`` ends the run with one line and exit status
``NONFINITE_EXIT_CODE``; ``skip`` drops the step as a grad scaler does (and, unlike one,
also restores the batch-norm statistics the bad batch's forward pass changed), counts it in
TensorBoard, and stops after ``train.max_skipped_steps`` in a row.
"""

from __future__ import annotations

import math

import torch

from distq.config.schema import TrainConfig
from distq.errors import DistqError

NONFINITE_EXIT_CODE = 4
"""Exit status of a run stopped because its loss or gradients were not finite."""


class NonFiniteTraining(DistqError):
    """The run diverged; the CLI exits with NONFINITE_EXIT_CODE."""


class NonFiniteGuard:
    def __init__(self, cfg: TrainConfig, buffers: list[torch.Tensor]):
        self.skip = cfg.on_nonfinite == "skip"
        self.max_in_a_row = cfg.max_skipped_steps
        self.skipped = 0
        """Steps skipped over the whole run (kept in checkpoints)."""
        self.in_a_row = 0
        self.buffers = [b for b in buffers if b.is_floating_point()]
        self.saved: list[torch.Tensor] | None = None
        self.bad_loss: torch.Tensor | None = None

    def start_step(self) -> None:
        """Before the first micro-batch of a step: remember the batch-norm statistics (skip mode)."""
        self.bad_loss = None
        if self.skip and self.buffers:
            if self.saved is None:
                self.saved = [b.detach().clone() for b in self.buffers]
            else:
                torch._foreach_copy_(self.saved, self.buffers)

    def add_loss(self, total: torch.Tensor) -> None:
        """A micro-batch's loss (no host synchronisation here)."""
        bad = ~torch.isfinite(total.detach())
        self.bad_loss = bad if self.bad_loss is None else self.bad_loss | bad

    def end_step(self, epoch: int, step: int, grad_norm: float | None, any_rank) -> bool:
        """After the optimizer step ``step`` of ``epoch`` (both 1-based): True if it was finite.
        ``any_rank(flag)`` is true on every rank when ``flag`` is true on any. Raises
        NonFiniteTraining to stop."""
        loss_bad = bool(self.bad_loss.item()) if self.bad_loss is not None else False
        norm_bad = grad_norm is not None and not math.isfinite(grad_norm)
        if not any_rank(loss_bad or norm_bad):
            self.in_a_row = 0
            return True
        where = f"epoch {epoch}, step {step}"
        if loss_bad:
            what = "the training loss is"
        elif norm_bad:
            what = f"the gradient norm ({grad_norm}) is"
        else:
            what = "another process's training loss is"
        if not self.skip:
            raise NonFiniteTraining(
                f"{where}: {what} not finite: the run diverged and stopped (train.on_nonfinite=stop) without applying that step "
                "and without checkpointing it: train again with a lower train.lr (a new run.dir, or --overwrite), or set "
                "train.on_nonfinite=skip to skip such steps"
            )
        if self.saved is not None:
            torch._foreach_copy_(self.buffers, self.saved)
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteTraining(
                f"{where}: {self.in_a_row} steps in a row were not finite (train.max_skipped_steps={self.max_in_a_row}; now {what} "
                "not finite): the run diverged and stopped, every one of those steps skipped and none checkpointed: train again "
                "with a lower train.lr (a new run.dir, or --overwrite)"
            )
        return False
