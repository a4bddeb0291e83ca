"""Config files: typed values, overrides, rejected keys and values with messages that say what to do."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from distq.config import ConfigError, DistqConfig, config_from_dict, describe_keys, load_config, to_dict
from distq.config.loader import parse_overrides, valid_keys
from distq.quant.functional import VALID_BITS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg == DistqConfig()
    assert (cfg.seed, cfg.model.arch, cfg.quant.w_bits, cfg.quant.a_bits, cfg.train.epochs) == (0, "resnet18", 32, 32, 90)
    assert cfg.data.root is None and cfg.data.loader == "torchvision"


@pytest.mark.parametrize("name,bits", [("digits_w4a4.yaml", 4), ("digits_fp.yaml", 32)])
def test_shipped_configs_load(name, bits):
    cfg = load_config(CONFIGS / name)
    assert (cfg.quant.w_bits, cfg.quant.a_bits) == (bits, bits)
    assert (cfg.model.arch, cfg.model.width, cfg.model.small_input) == ("resnet18", 16, True)
    assert (cfg.data.image_size, cfg.data.batch_size, cfg.data.crop_scale) == (32, 64, [0.5, 1.0])
    assert (cfg.train.epochs, cfg.train.warmup_epochs, cfg.train.weight_decay) == (15, 1.0, 5e-4)
    assert isinstance(cfg.train.warmup_epochs, float)


def test_overrides_are_typed_and_win_over_the_file():
    cfg = load_config(
        CONFIGS / "digits_w4a4.yaml",
        ["train.epochs=3", "train.lr=0.05", "quant.w_bits=2", "data.crop_scale=[0.2, 1.0]", "model.pretrained=null", "data.hflip=true", "run.dir=runs/x"],
    )
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == 0.05
    assert cfg.quant.w_bits == 2 and cfg.quant.a_bits == 4  # the file's value for keys not overridden
    assert cfg.data.crop_scale == [0.2, 1.0]
    assert cfg.model.pretrained is None
    assert cfg.data.hflip is True
    assert cfg.run.dir == "runs/x"


def test_parse_overrides_nests_and_parses_yaml():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]", "e=", "f=0.5"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2], "e": "", "f": 0.5}


@pytest.mark.parametrize(
    "override,suggestion",
    [
        ("train.epcohs=3", "train.epochs"),
        ("trian.epochs=3", "train.epochs"),
        ("quant.wbits=4", "quant.w_bits"),
        ("model.widht=8", "model.width"),
        ("data.batchsize=8", "data.batch_size"),
    ],
)
def test_unknown_key_suggests_the_closest(override, suggestion):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == f"unknown config key '{key}': did you mean '{suggestion}'?"


def test_unknown_key_without_a_close_match_points_to_help():
    with pytest.raises(ConfigError, match="unknown config key 'zzzzzz'.*--help-config"):
        load_config(None, ["zzzzzz=1"])


def test_unknown_key_in_a_file_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: 3\n  lr_schedule: cosine\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.lr_schedule'"):
        load_config(path)


@pytest.mark.parametrize("key", ["quant.w_bits", "quant.a_bits"])
@pytest.mark.parametrize("bits", VALID_BITS)
def test_valid_bit_widths(key, bits):
    cfg = load_config(None, [f"{key}={bits}"])
    assert getattr(cfg.quant, key.split(".")[1]) == bits


@pytest.mark.parametrize("key", ["quant.w_bits", "quant.a_bits"])
@pytest.mark.parametrize("bits", [0, 9, 16, 31, 33, -4])
def test_bit_widths_outside_the_valid_set_are_rejected(key, bits):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}={bits}"])
    assert str(info.value) == f"{key}={bits} is not a valid bit-width: use 1..8, or 32 for full precision"


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.epochs=abc", "train.epochs must be an integer, got 'abc'"),
        ("train.epochs=2.5", "train.epochs must be an integer, got 2.5"),
        ("quant.w_bits=true", "quant.w_bits must be an integer, got True"),
        ("train.lr=fast", "train.lr must be a number, got 'fast'"),
        ("data.hflip=maybe", "data.hflip must be true or false, got 'maybe'"),
        ("quant.method=lsqq", "quant.method='lsqq' is not allowed: use one of 'aqe', 'dorefa', 'lsq', 'pact'"),
        ("data.crop_scale=0.5", "data.crop_scale must be a list, got 0.5"),
        ("train.epochs=0", "train.epochs=0 must be > 0"),
        ("train.lr=-0.1", "train.lr=-0.1 must be > 0"),
        ("data.workers=-1", "data.workers=-1 must be >= 0"),
        ("data.crop_scale=[0.9, 0.5]", "data.crop_scale=[0.9, 0.5] must be [low, high] with 0 < low <= high <= 1"),
        ("train.schedule=multistep", "train.milestones is empty but train.schedule=multistep"),
        ("train.epochs", "override 'train.epochs' is not of the form key=value"),
        ("train=3", "train must be a mapping of keys to values, got 3"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(message)


def test_config_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="config file .*missing.yaml' not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  epochs: [3\n")
    with pytest.raises(ConfigError, match="broken.yaml' is not valid YAML at line"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty.yaml' is empty"):
        load_config(empty)


def test_to_dict_round_trip():
    cfg = load_config(CONFIGS / "digits_w4a4.yaml", ["train.epochs=7", "quant.method=aqe"])
    assert config_from_dict(to_dict(cfg)) == cfg


def test_describe_keys_lists_every_leaf_key_with_default_and_meaning():
    lines = describe_keys()
    assert "train.epochs = 90  # Training epochs." in lines
    assert any(line.startswith("quant.w_bits = 32  # Weight bit-width") for line in lines)
    assert any(line.startswith("data.root = None  # ImageNet-layout folder") for line in lines)
    assert any(line.startswith("guided.students[].w_bits = None  # The student's weight bit-width") for line in lines)
    described = {line.split(" ")[0].rstrip(":") for line in lines}
    for section in ("run", "model", "quant", "data", "train", "log", "dist"):
        cls = type(getattr(DistqConfig(), section))
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            assert key in described or any(d.startswith(key + ".") for d in described), key
    keys = set(valid_keys(DistqConfig))
    leaves = {k for k in keys if not any(other.startswith(k + ".") for other in keys)}
    assert leaves <= described
    assert described - keys == {"guided.students[].w_bits", "guided.students[].a_bits", "guided.students[].method", "guided.students[].name"}


def test_help_config_describes_every_key(capsys):
    """``distq train --help-config``: every key and optional section has a meaning after ``#``."""
    from distq.cli import main

    assert main(["train", "--help-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == describe_keys()
    undescribed = [line for line in lines if "  # " not in line or not line.split("  # ", 1)[1].strip()]
    assert undescribed == []


def test_guided_students_take_quant_bits_as_their_default():
    cfg = load_config(CONFIGS / "digits_resnet18_w4a4_guided.yaml", ["quant.w_bits=2", "quant.a_bits=3", "guided.students=[{}, {w_bits: 4}]"])
    assert [(s.name, s.w_bits, s.a_bits) for s in cfg.guided.students] == [("student_w2a3", 2, 3), ("student_w4a3", 4, 3)]
    assert config_from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["quant.w_bits=2", "quant.a_bits=2"],  # the shipped guided config trains one W4A4 student
            "quant.w_bits=2 applies to no student: every entry of guided.students sets its own w_bits (4); set the students' "
            "bits in guided.students (e.g. guided.students=[{w_bits: 2, a_bits: 2}]) or leave w_bits out of them to use quant.w_bits",
        ),
        (["quant.a_bits=3"], "quant.a_bits=3 applies to no student: every entry of guided.students sets its own a_bits (4)"),
        (["guided.students=[{w_bits: 2, a_bits: 2, name: s}, {w_bits: 4, a_bits: 4, name: s}]"], "guided.students has duplicate names ['s', 's']"),
    ],
)
def test_guided_quant_bits_no_student_uses_are_refused(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "digits_resnet18_w4a4_guided.yaml", overrides)
    assert str(info.value).startswith(message)


def test_configs_are_keyword_only():
    with pytest.raises(TypeError):
        DistqConfig(1)  # the positional call must fail
