"""The private DeepSpeed attributes distq reads exist in the installed release, pyproject.toml
bounds DeepSpeed to the release tested, and a missing attribute stops the engine naming it."""

from __future__ import annotations

import inspect
import re
import types
from pathlib import Path

import pytest

from distq.distributed import deepspeed_contract as contract
from distq.errors import DistqError

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_deepspeed_is_the_tested_one_and_pyproject_bounds_it():
    import deepspeed

    assert deepspeed.__version__ == contract.TESTED
    pins = re.findall(r'"deepspeed([^"]*)"', (ROOT / "pyproject.toml").read_text())
    assert pins == [f"=={contract.TESTED}"], pins


def test_every_private_attribute_exists_in_the_installed_deepspeed():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.utils import groups, mixed_precision_linkage, tensor_fragment

    zero = inspect.getsource(DeepSpeedZeroOptimizer)
    for name in contract.ZERO_OPTIMIZER:
        assert f"self.{name} =" in zero or f"def {name}(" in zero, f"DeepSpeedZeroOptimizer.{name}"
    linkage = inspect.getsource(tensor_fragment) + inspect.getsource(mixed_precision_linkage)
    for name in contract.PARAMETER + contract.FRAGMENT:
        assert name in linkage, name
    contract.check_groups_module(groups)


def zero_optimizer(missing: str | None = None, fragment_missing: str | None = None):
    mapping = types.SimpleNamespace(**{n: 0 for n in contract.FRAGMENT if n != fragment_missing})
    param = types.SimpleNamespace(_hp_mapping=mapping)
    attrs = {n: None for n in contract.ZERO_OPTIMIZER if n != missing}
    attrs["bit16_groups"] = [[param]] if missing != "bit16_groups" else None
    if missing == "bit16_groups":
        del attrs["bit16_groups"]
    return types.SimpleNamespace(**attrs)


def test_a_complete_optimizer_passes():
    contract.check_zero_optimizer(zero_optimizer())


@pytest.mark.parametrize("name", contract.ZERO_OPTIMIZER)
def test_a_missing_optimizer_attribute_is_named(name):
    with pytest.raises(DistqError, match=rf"has no SimpleNamespace\.{name}, which distq's ZeRO checkpoints"):
        contract.check_zero_optimizer(zero_optimizer(missing=name))


@pytest.mark.parametrize("name", contract.FRAGMENT)
def test_a_missing_fragment_attribute_is_named(name):
    with pytest.raises(DistqError, match=rf"_hp_mapping\.{name}.*install deepspeed=={contract.TESTED}"):
        contract.check_zero_optimizer(zero_optimizer(fragment_missing=name))


def test_a_missing_groups_attribute_is_named():
    with pytest.raises(DistqError, match=r"deepspeed\.utils\.groups\._WORLD_GROUP"):
        contract.check_groups_module(types.SimpleNamespace())
