"""TensorBoard scalars, written by one process only."""

from __future__ import annotations

from pathlib import Path

FOLDER = "tb"
"""TensorBoard's folder in the run directory."""


class ScalarLog:
    """A thin SummaryWriter wrapper that is a no-op when disabled (other ranks, or off)."""

    def __init__(self, run_dir: str | Path, enabled: bool, purge_step: int | None = None):
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(run_dir) / FOLDER), purge_step=purge_step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, float(value), step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
