"""Data order: each step's samples do not depend on how many processes share the global batch."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from distq.data.order import BatchLayout, epoch_permutation, rank_samples, steps_per_epoch
from distq.errors import DistqError

N, SEED = 1442, 3


def global_steps(layout: BatchLayout, epoch: int, start_step: int = 0) -> list[set[int]]:
    """The set of samples of every optimizer step, gathered from every rank's reading order."""
    per_rank = [rank_samples(N, SEED, epoch, layout, rank, start_step) for rank in range(layout.world)]
    per_step = layout.grad_accum * layout.micro_batch
    steps = len(per_rank[0]) // per_step
    return [set().union(*(set(r[k * per_step : (k + 1) * per_step]) for r in per_rank)) for k in range(steps)]


@pytest.mark.parametrize("layout", [BatchLayout(32, 1, 2), BatchLayout(16, 2, 2), BatchLayout(8, 1, 8), BatchLayout(32, 2, 1)])
def test_the_samples_of_each_step_are_those_of_one_process(layout):
    one = global_steps(BatchLayout(64, 1, 1), epoch=2)
    assert global_steps(layout, epoch=2) == one
    assert len(one) == steps_per_epoch(N, 64) == 22


def test_every_sample_at_most_once_and_all_but_the_remainder():
    layout = BatchLayout(16, 1, 3)
    used = [i for rank in range(3) for i in rank_samples(N, SEED, 0, layout, rank)]
    assert len(used) == len(set(used)) == (N // 48) * 48
    assert set(used) <= set(range(N))


def test_a_switch_of_world_size_mid_epoch_uses_each_sample_once():
    before = [i for rank in range(2) for i in rank_samples(N, SEED, 1, BatchLayout(32, 1, 2), rank)[: 7 * 32]]
    after = rank_samples(N, SEED, 1, BatchLayout(32, 2, 1), 0, start_step=7)
    assert len(before) + len(after) == len(set(before) | set(after)) == 22 * 64


def test_one_process_reads_in_distributed_samplers_order():
    sampler = DistributedSampler(range(N), num_replicas=1, rank=0, shuffle=True, seed=SEED)
    sampler.set_epoch(4)
    assert rank_samples(N, SEED, 4, BatchLayout(64), 0) == list(sampler)[: 22 * 64]
    assert not torch.equal(epoch_permutation(N, SEED, 4), epoch_permutation(N, SEED, 5))


@pytest.mark.parametrize(
    "global_batch,world,max_micro,want",
    [(64, 1, 32, BatchLayout(32, 2, 1)), (64, 2, 32, BatchLayout(32, 1, 2)), (48, 3, 32, BatchLayout(16, 1, 3)), (64, 1, 24, BatchLayout(16, 4, 1)), (96, 4, 64, BatchLayout(24, 1, 4))],
)
def test_split_keeps_the_global_batch_with_the_largest_micro_batch(global_batch, world, max_micro, want):
    assert BatchLayout.split(global_batch, world, max_micro, "x") == want


def test_split_names_the_process_counts_that_work():
    with pytest.raises(DistqError, match=r"checkpoint X has a global batch of 64 images, which 3 processes cannot share evenly: run on 1, 2, 4, 8, 16, 32 or 64 processes"):
        BatchLayout.split(64, 3, 32, "checkpoint X")
