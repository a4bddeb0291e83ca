"""What distq reads from DeepSpeed beyond its public API, in one place, checked when an engine starts.

ZeRO 1/2 checkpoints are written from DeepSpeed's flat fp32 partitions and the per-parameter
fragment maps that link them to the model (``DeepSpeedEngine.optimizer_fragments``), and a frozen
rank is timed out through DeepSpeed's own clone of the world group. None of that is public API:
a release that renamed one of these would make distq write wrong checkpoints or hang, so the
engine refuses to start instead, naming the attribute. ``pyproject.toml`` bounds DeepSpeed to the
versions the suite passed with (``TESTED``); tests/distributed/test_deepspeed_contract.py checks
the installed release against this list without starting an engine.
"""

from __future__ import annotations

from distq.errors import DistqError

TESTED = "0.19.8"
"""The DeepSpeed release the suite passed with: pyproject.toml's bound."""

ZERO_OPTIMIZER = ("bit16_groups", "single_partition_of_fp32_groups", "_hp_optimizer_states_linked", "refresh_fp32_params", "optimizer")
"""Read from ZeRO 1/2's optimizer (``DeepSpeedZeroOptimizer``)."""
PARAMETER = ("_hp_mapping",)
"""Set by ZeRO 1/2 on every parameter: where it lies in the flat partition."""
FRAGMENT = ("hp_fragment_address", "lp_fragment_address")
"""Of a parameter's ``_hp_mapping``."""
GROUPS = ("_WORLD_GROUP",)
"""Of ``deepspeed.utils.groups``: the clone of the world group ZeRO's collectives use."""


def _refuse(where: str, name: str) -> DistqError:
    import deepspeed

    return DistqError(
        f"DeepSpeed {deepspeed.__version__} has no {where}.{name}, which distq's ZeRO checkpoints and timeouts rely on "
        f"(tested with DeepSpeed {TESTED}): install deepspeed=={TESTED}, or run dist.zero_stage=0"
    )


def check_groups_module(groups) -> None:
    for name in GROUPS:
        if not hasattr(groups, name):
            raise _refuse("deepspeed.utils.groups", name)


def check_zero_optimizer(optimizer) -> None:
    """Every private attribute distq reads from a ZeRO 1/2 optimizer and its parameters."""
    for name in ZERO_OPTIMIZER:
        if not hasattr(optimizer, name):
            raise _refuse(type(optimizer).__name__, name)
    for group in optimizer.bit16_groups:
        for param in group:
            for name in PARAMETER:
                if not hasattr(param, name):
                    raise _refuse("a ZeRO parameter", name)
            mapping = param._hp_mapping
            if mapping is None:
                continue
            for name in FRAGMENT:
                if not hasattr(mapping, name):
                    raise _refuse("a parameter's _hp_mapping", name)
