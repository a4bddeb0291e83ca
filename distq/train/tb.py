"""TensorBoard, written by one process only.

The run's own curves (loss, accuracy, learning rate, the controller's few scalars) are in
``RUN_DIR/tb``. A run of several models (a guide and its students) also writes each model's
loss and accuracy under the same tags in ``RUN_DIR/tb/<model>``: TensorBoard shows those as runs
of their own, overlaid on one card per tag. Per-layer bit-widths are a text table per quantized
model (TensorBoard's Text tab), written when they change, not a scalar series per layer.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = "tb"
"""TensorBoard's folder in the run directory."""


class ScalarLog:
    """A thin SummaryWriter wrapper that is a no-op when disabled (other ranks, or off)."""

    def __init__(self, run_dir: str | Path, enabled: bool, purge_step: int | None = None):
        self._folder, self._purge_step = Path(run_dir) / FOLDER, purge_step
        self._writer = self._open(self._folder) if enabled else None
        self._models: dict[str, object] = {}
        self._tables: dict[str, str] = {}

    def _open(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(folder), purge_step=self._purge_step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, float(value), step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def model_scalars(self, model: str, values: dict[str, float], step: int) -> None:
        """``values`` of one model of several, in its own folder (overlaid with the others' in TensorBoard)."""
        if self._writer is None:
            return
        if model not in self._models:
            self._models[model] = self._open(self._folder / model)
        for tag, value in values.items():
            self._models[model].add_scalar(tag, float(value), step)

    def table_if_changed(self, tag: str, rows: list[tuple[str, ...]], header: tuple[str, ...], step: int) -> None:
        """A markdown table under ``tag`` in the Text tab, when it differs from the last one written."""
        text = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows])
        if self._writer is None or self._tables.get(tag) == text:
            return
        self._tables[tag] = text
        self._writer.add_text(tag, text, step)

    def flush(self) -> None:
        for writer in (self._writer, *self._models.values()):
            if writer is not None:
                writer.flush()

    def close(self) -> None:
        for writer in (self._writer, *self._models.values()):
            if writer is not None:
                writer.close()
