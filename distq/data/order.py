"""Which training samples each rank reads, step by step: a pure function of
(seed, epoch, batch layout), the same on any number of processes.

An epoch is a permutation of the training set drawn from (seed, epoch), cut into global
batches of ``layout.global_batch`` samples (the remainder is left out, a different one each
epoch). A global batch is ``grad_accum`` micro-steps of ``world`` consecutive slices of
``micro_batch`` samples: rank r's micro-batch j of step k is slice r of micro-step j. So the
samples of step k do not depend on how many processes share them, a run stopped after step
k continues on any number of processes with step k + 1, and every sample of the epoch is
used exactly once.

A sharded training set (``data.format=shards``) has its own epoch order (``shard_order``: one
shard after another, each shuffled) cut the same way (``rank_slice``), with the same guarantees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distq.errors import DistqError


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch is split: ``micro_batch`` images per process and forward pass,
    ``grad_accum`` passes per optimizer step, ``world`` processes."""

    micro_batch: int
    grad_accum: int = 1
    world: int = 1

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    def describe(self) -> str:
        accum = f" x {self.grad_accum} accumulation steps" if self.grad_accum > 1 else ""
        return f"{self.micro_batch} images per process{accum} x {self.world} process{'es' if self.world > 1 else ''}"

    @classmethod
    def split(cls, global_batch: int, world: int, max_micro_batch: int, source: str) -> BatchLayout:
        """The layout that keeps ``global_batch`` on ``world`` processes with the largest micro-batch
        <= ``max_micro_batch`` (fewest accumulation steps); DistqError if the batch does not divide."""
        if global_batch % world:
            counts = [str(d) for d in range(1, global_batch + 1) if global_batch % d == 0][:10]
            raise DistqError(
                f"{source} has a global batch of {global_batch} images, which {world} processes cannot share evenly: "
                f"run on {', '.join(counts[:-1])} or {counts[-1]} processes"
            )
        per_process = global_batch // world
        micro = max(d for d in range(1, min(per_process, max_micro_batch) + 1) if per_process % d == 0)
        return cls(micro, per_process // micro, world)


def configured_layout(cfg, world: int) -> BatchLayout:
    """The batch layout a fresh run of ``cfg`` (a DistqConfig) uses on ``world`` processes."""
    if cfg.train.global_batch is not None:
        return BatchLayout.split(cfg.train.global_batch, world, cfg.data.batch_size, f"train.global_batch={cfg.train.global_batch}")
    return BatchLayout(cfg.data.batch_size, cfg.dist.grad_accum, world)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's order (with one process and no accumulation, the order PyTorch's
    ``DistributedSampler(seed=seed)`` gives for the epoch)."""
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=generator)


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    return num_samples // global_batch


def rank_samples(num_samples: int, seed: int, epoch: int, layout: BatchLayout, rank: int, start_step: int = 0) -> list[int]:
    """Sample indices rank ``rank`` reads in ``epoch`` from optimizer step ``start_step`` on,
    in reading order (``micro_batch`` at a time)."""
    return rank_slice(epoch_permutation(num_samples, seed, epoch), layout, rank, start_step)


def rank_slice(order: torch.Tensor, layout: BatchLayout, rank: int, start_step: int = 0) -> list[int]:
    """Rank ``rank``'s part of an epoch whose samples come in ``order``: the order is cut into
    global batches, each batch into micro-steps of ``world`` slices; slice ``rank`` is this rank's."""
    steps = steps_per_epoch(len(order), layout.global_batch)
    grid = order[: steps * layout.global_batch].view(steps, layout.grad_accum, layout.world, layout.micro_batch)
    return grid[start_step:, :, rank, :].reshape(-1).tolist()


def shard_order(shard_sizes: list[int], seed: int, epoch: int) -> torch.Tensor:
    """The epoch's order of a sharded training set (sample i of shard s is number
    ``sum(shard_sizes[:s]) + i``): the shards in a random order, each shard's samples in a random
    order, both drawn from (seed, epoch). Consecutive global batches thus come from one shard at a
    time: a reader visits each shard once per epoch, whatever the number of processes."""
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    starts = torch.tensor([0, *shard_sizes]).cumsum(0)
    parts = [starts[s] + torch.randperm(shard_sizes[s], generator=generator) for s in torch.randperm(len(shard_sizes), generator=generator).tolist()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class EpochOrder:
    """The epoch orders of a training set of ``num_samples``: a uniform permutation
    (``epoch_permutation``) or, given ``shard_sizes``, ``shard_order``; what every train loader reads."""

    num_samples: int
    seed: int
    shard_sizes: tuple[int, ...] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self.shard_sizes is None:
            return epoch_permutation(self.num_samples, self.seed, epoch)
        return shard_order(list(self.shard_sizes), self.seed, epoch)

    def rank_samples(self, epoch: int, layout: BatchLayout, rank: int, start_step: int = 0) -> list[int]:
        return rank_slice(self.permutation(epoch), layout, rank, start_step)

    def micro_batches(self, layout: BatchLayout, start_step: int = 0) -> int:
        """Micro-batches each rank reads in an epoch from ``start_step`` on."""
        return (steps_per_epoch(self.num_samples, layout.global_batch) - start_step) * layout.grad_accum
