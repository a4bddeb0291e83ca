"""One intra-op thread for the export tests' in-process trainings and runs."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_thread():
    """One intra-op thread, as the CLI runs of the test suite: on a small shared machine two
    threads per process cost more in waiting than they gain (training here takes seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sgd_steps(model, optimizer, images, labels, steps: int, generator) -> None:
    """``steps`` optimizer steps on random batches of 64 of ``images`` (the export tests' trainings)."""
    import torch.nn.functional as F

    for _ in range(steps):
        batch = torch.randint(0, len(images), (64,), generator=generator)
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
