"""From a training checkpoint to its models: the one way ``distq eval``, ``distq export`` and the
integer engine's verifier rebuild a trained network."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch.nn as nn

from distq.checkpoint import CheckpointError, load_weights
from distq.checkpoint.finite import NonFiniteError, describe_nonfinite, nonfinite_entries
from distq.checkpoint.store import read_state, say_on_stderr, state_file
from distq.config import DistqConfig, config_from_dict
from distq.models.build import build_model
from distq.models.team import SINGLE, roster


@dataclasses.dataclass
class TrainedCheckpoint:
    """A training checkpoint's config, class names and models (by name), ready to rebuild."""

    source: str
    state: dict
    """The rank-0 training state (``epoch``, ``step``, ``history``, ...)."""
    cfg: DistqConfig
    """The run's config, without ``model.pretrained``: the weights come from the checkpoint, so
    the file the run started from need not exist any more."""

    @property
    def classes(self) -> list[str]:
        return list(self.state["classes"])

    @property
    def names(self) -> list[str]:
        return list(self.state["models"])

    def default_name(self) -> str:
        """The model a command means when none is named: "model", or the only one."""
        if SINGLE in self.state["models"]:
            return SINGLE
        if len(self.names) == 1:
            return self.names[0]
        raise CheckpointError(f"checkpoint {self.source!r} holds models {', '.join(self.names)}: choose one by name (distq export: --model NAME)")

    def model(self, name: str | None = None) -> nn.Module:
        """The trained network ``name`` (default: ``default_name()``), in eval mode."""
        name = self.default_name() if name is None else name
        if name not in self.state["models"]:
            raise CheckpointError(f"checkpoint {self.source!r} has no model {name!r}: choose one of {', '.join(self.names)}")
        member = next((m for m in roster(self.cfg) if m.name == name), None)
        bits = {} if member is None else {"w_bits": member.w_bits, "a_bits": member.a_bits, "method": member.method}
        model = build_model(self.cfg.model, self.cfg.quant, len(self.classes), **bits)
        # Checkpoints written before the quantizers' state reached the state_dict lack
        # ``_extra_state``; their bit-widths are the config's, which build_model has set.
        load_weights(model, self.state["models"][name], f"checkpoint {self.source!r}", allow_missing_quant_state=True)
        return model.eval()


def load_trained(path: str | Path, say: Callable[[str], None] = say_on_stderr) -> TrainedCheckpoint:
    """A run directory, a checkpoint folder or a ``state.pt``, as ``distq.checkpoint.load_state`` reads it
    (checked against its manifest; ``say`` gets one line per newer checkpoint passed over); a
    NonFiniteError if its models hold NaN or infinite values."""
    file = state_file(path, say)
    state = read_state(file)
    bad = nonfinite_entries(state["models"])
    if bad:
        raise NonFiniteError(
            f"checkpoint {str(file)!r} cannot be used: {describe_nonfinite(bad)}: the run diverged; evaluate or export "
            "an earlier checkpoint (RUN_DIR/checkpoints/step_*), or train again with a lower train.lr"
        )
    cfg = config_from_dict(state["config"])
    cfg.model = dataclasses.replace(cfg.model, pretrained=None)
    return TrainedCheckpoint(str(path), state, cfg)
