"""The events of the training loop that the precision controller and its policies react to."""

from __future__ import annotations

from enum import Enum


class Event(Enum):
    """Where the controller and its policies act. The training loop, as pseudocode::

        FIT_START
        for epoch in epochs:
            EPOCH_START
            for batch in data:
                BATCH_START   # the controller sets every student's bits; policies: SP subset, AQE alpha, aux factor
                forward, backward, optimizer step
                AFTER_STEP    # AQE clips the latent weights to [-1, 1]
            EPOCH_END         # SP quantizes every unit for validation; then validation and the checkpoint
        FIT_END

    A policy reacts to an event by defining ``on_<event value>`` (e.g. ``on_batch_start``).
    """

    FIT_START = "fit_start"
    EPOCH_START = "epoch_start"
    BATCH_START = "batch_start"
    AFTER_STEP = "after_step"
    EPOCH_END = "epoch_end"
    FIT_END = "fit_end"
