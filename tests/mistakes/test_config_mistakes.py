"""Config mistakes that used to be accepted silently (issue 23): each is now one error that names
the key or file and says what to do."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from distq.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPE = CONFIGS / "digits_w4a4.yaml"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text",
    ["", "# every key commented out\n# train:\n#   epochs: 3\n", "{}\n", "null\n"],
    ids=["blank", "comments", "braces", "null"],
)
def test_an_empty_config_file_is_refused(tmp_path, text):
    empty = write(tmp_path / "empty.yaml", text)
    with pytest.raises(ConfigError, match=r"config file '.*empty\.yaml' is empty: .*base: FILE"):
        load_config(empty)
    only_base = write(tmp_path / "only_base.yaml", f"base: {RECIPE}\n")
    assert load_config(only_base) == load_config(RECIPE)


def test_a_key_written_twice_is_refused_with_both_lines(tmp_path):
    sections = write(tmp_path / "sections.yaml", "train:\n  epochs: 3\nquant:\n  w_bits: 4\ntrain:\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"config file '.*sections\.yaml' sets 'train' twice \(lines 1 and 5\)"):
        load_config(sections)
    keys = write(tmp_path / "keys.yaml", "train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"'.*keys\.yaml' sets 'train\.lr' twice \(lines 2 and 4\)"):
        load_config(keys)
    child = write(tmp_path / "child.yaml", "base: keys.yaml\nmodel:\n  width: 8\n")
    with pytest.raises(ConfigError, match=r"'.*keys\.yaml' sets 'train\.lr' twice"):
        load_config(child)
    with pytest.raises(ConfigError, match=r"override .* sets 'guided\.students\[0\]\.w_bits' twice"):
        load_config(None, ["guided.students=[{w_bits: 2, w_bits: 4}]"])
    merged = write(tmp_path / "merged.yaml", "train:\n  <<: {lr: 0.1, epochs: 3}\n  lr: 0.2\n")
    assert (load_config(merged).train.lr, load_config(merged).train.epochs) == (0.2, 3)  # a merge key may be overridden


def test_an_override_does_not_replace_a_section_that_is_not_a_mapping(tmp_path):
    scalar = write(tmp_path / "scalar.yaml", "train: 5\n")
    with pytest.raises(ConfigError, match=r"'train' in config file '.*scalar\.yaml' must be a section .* got 5"):
        load_config(scalar, ["train.epochs=2"])
    nested = write(tmp_path / "nested.yaml", "precision:\n  progressive: on\n")
    with pytest.raises(ConfigError, match=r"'precision\.progressive' in config file '.*nested\.yaml' must be a section"):
        load_config(nested, ["precision.progressive.stages=[]"])
    with pytest.raises(ConfigError, match="train must be a mapping of keys to values, got 5"):
        load_config(RECIPE, ["train=5"])
    assert load_config(write(tmp_path / "null.yaml", "train:\nseed: 1\n"), ["train.epochs=2"]).train.epochs == 2


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.lr=nan", "train.lr"),
        ("train.lr=inf", "train.lr"),
        ("train.lr=.inf", "train.lr"),
        ("train.momentum=-inf", "train.momentum"),
        ("train.grad_clip=.inf", "train.grad_clip"),
        ("data.crop_scale=[.nan, 1.0]", r"data.crop_scale\[0\]"),
    ],
)
def test_non_finite_numbers_are_refused(tmp_path, override, key):
    with pytest.raises(ConfigError, match=rf"^{key}=\S+ is not a finite number"):
        load_config(None, [override])
    in_file = write(tmp_path / "nan.yaml", "train:\n  weight_decay: .nan\n")
    with pytest.raises(ConfigError, match=r"^train\.weight_decay=nan is not a finite number"):
        load_config(in_file)


def test_a_directory_or_missing_base_is_named(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConfigError, match=r"config file '.*folder' is a directory: pass a YAML file"):
        load_config(tmp_path / "folder")
    missing = write(tmp_path / "missing_base.yaml", "base: nope.yaml\ntrain:\n  epochs: 2\n")
    with pytest.raises(
        ConfigError, match=r"'base: nope\.yaml' in config file '.*missing_base\.yaml' not found \('.*nope\.yaml'\)"
    ):
        load_config(missing)
    folder_base = write(tmp_path / "folder_base.yaml", "base: folder\n")
    with pytest.raises(ConfigError, match=r"'base: folder' in config file '.*folder_base\.yaml' is a directory"):
        load_config(folder_base)
    with pytest.raises(ConfigError, match=r"'base' in config file '.*empty_base\.yaml' is empty"):
        load_config(write(tmp_path / "empty_base.yaml", "base:\ntrain:\n  epochs: 2\n"))


def test_the_cli_refuses_them_in_one_line(run_distq, tmp_path):
    empty = write(tmp_path / "empty.yaml", "# nothing yet\n")
    twice = write(tmp_path / "twice.yaml", "train:\n  epochs: 3\ntrain:\n  lr: 0.2\n")
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda path: run_distq("plan", path, timeout=120), [empty, twice]))
    expected = [
        rf"distq: error: config file '{re.escape(str(empty))}' is empty: .*\n",
        rf"distq: error: config file '{re.escape(str(twice))}' sets 'train' twice \(lines 1 and 3\): .*\n",
    ]
    for proc, pattern in zip(outcomes, expected):
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
        assert re.fullmatch(pattern, proc.stderr), proc.stderr


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("**/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config(path)  # no duplicate keys, no empty file, no non-finite number
