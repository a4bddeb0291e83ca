"""Ranks agreeing on a flag (a preemption signal) without stalling the training loop."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from distq.distributed.env import DistEnv


class RankVote:
    """``vote(flag)`` is true on every rank, at the same call, once ``flag`` was true on any rank.

    Each call starts a MAX all-reduce of the flag and returns the outcome of the previous
    call's, so the answer comes one call late but the loop never waits on it: the vote runs
    on its own CPU (gloo) group, where reading the result is not the host-device sync an
    NCCL all-reduce read with ``.item()`` would be (it waits for the step's kernels to
    finish), and which keeps it apart from the training's collectives.
    Every rank makes the same calls, so every rank sees the same outcome at the same call.
    One process answers at once.
    """

    def __init__(self, env: DistEnv, timeout_s: float):
        self.distributed = env.distributed
        # Collective: every rank builds its vote at the same point. The group's timeout is the
        # job's (dist.timeout_s): a new group's default is 30 min, so a frozen rank would hang it.
        timeout = datetime.timedelta(seconds=timeout_s)
        self.group = dist.new_group(backend="gloo", timeout=timeout) if self.distributed else None
        self.pending: tuple[dist.Work, torch.Tensor] | None = None

    def __call__(self, flag: bool) -> bool:
        if not self.distributed:
            return flag
        if self.outcome():
            return True  # decided: start no further vote
        ballot = torch.tensor([int(flag)])
        self.pending = (dist.all_reduce(ballot, op=dist.ReduceOp.MAX, group=self.group, async_op=True), ballot)
        return False

    def outcome(self) -> bool:
        """Wait for the vote in flight, if any, and return whether some rank voted yes."""
        if self.pending is None:
            return False
        work, ballot = self.pending
        self.pending = None
        work.wait()
        return bool(ballot.item())
