"""Checkpoint-and-requeue on a scheduler's warning signal (SLURM ``--signal=USR1@secs``) or on
SIGTERM, with which SLURM (and Kubernetes, and most batch systems) pre-empts a job before its
SIGKILL ``KillWait`` seconds later (30 by default)."""

from __future__ import annotations

import signal

from distq.errors import DistqError

REQUEUE_EXIT_CODE = 3
"""Exit status of a run that saved a checkpoint on a preemption signal and wants a requeue."""


class Preempted(DistqError):
    """Raised after the checkpoint is written; the CLI exits with REQUEUE_EXIT_CODE."""


class PreemptionFlag:
    """Set by SIGUSR1 or SIGTERM; the trainer polls it between optimizer steps."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.raised = False
        self.signum = None
        for signum in signals:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True
        self.signum = signum
