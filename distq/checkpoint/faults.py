"""Fault injection for the checkpoint tests: ``DISTQ_KILL_AT=PHASE@EPOCH``.

Every process SIGKILLs itself at PHASE of the first checkpoint written at or after EPOCH
(completed epochs, fractions allowed: ``after-commit@1.5`` is the first checkpoint half-way
into the second epoch or later). Phases, in the order a checkpoint is written:

- ``mid-shards``: rank 0 has written its files, the other ranks none of theirs;
- ``before-commit``: every file is written, the manifest is not;
- ``after-commit``: the manifest is written, older checkpoints are not yet deleted.

The variable is read only when set; it is for tests, not for users.
"""

from __future__ import annotations

import os
import signal
import sys

from distq.errors import DistqError

PHASES = ("mid-shards", "before-commit", "after-commit")
VARIABLE = "DISTQ_KILL_AT"


class KillSwitch:
    def __init__(self, spec: str | None = None):
        spec = os.environ.get(VARIABLE) if spec is None else spec
        self.phase: str | None = None
        self.epoch = 0.0
        self.armed = False
        if not spec:
            return
        phase, _, epoch = spec.partition("@")
        try:
            self.epoch = float(epoch)
        except ValueError:
            self.epoch = -1.0
        if phase not in PHASES or self.epoch < 0:
            raise DistqError(f"{VARIABLE}={spec!r} is not PHASE@EPOCH with PHASE one of {', '.join(PHASES)}, e.g. before-commit@2")
        self.phase = phase

    def begin_checkpoint(self, epoch: float) -> None:
        """A checkpoint at ``epoch`` (completed epochs, fractional mid-epoch) is being written."""
        if self.phase is not None and epoch >= self.epoch:
            self.armed = True

    def reached(self, phase: str) -> None:
        """Die here if this is the armed checkpoint's phase."""
        if self.armed and phase == self.phase:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
