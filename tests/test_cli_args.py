"""The command line takes options and KEY=VALUE overrides in any order."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from distq.cli import build_parser, main, parse_args

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "digits_w4a4.yaml")


@pytest.mark.parametrize(
    "argv",
    [
        ["train", CONFIG, "--resume", "auto", "run.dir=X", "quant.w_bits=2"],
        ["train", CONFIG, "run.dir=X", "--resume", "auto", "quant.w_bits=2"],
        ["train", "--resume", "auto", CONFIG, "run.dir=X", "quant.w_bits=2"],
        ["train", CONFIG, "run.dir=X", "quant.w_bits=2", "--resume", "auto"],
    ],
)
def test_train_options_and_overrides_in_any_order(argv):
    args = parse_args(build_parser(), argv)
    assert (args.config, args.overrides, args.resume) == (CONFIG, ["run.dir=X", "quant.w_bits=2"], "auto")


def test_an_unknown_option_is_still_refused(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(build_parser(), ["train", CONFIG, "--resume", "auto", "run.dir=X", "--frobnicate"])
    assert info.value.code == 2
    assert "unrecognized arguments: --frobnicate" in capsys.readouterr().err


def test_plan_takes_overrides_after_its_options(digits_root, monkeypatch):
    monkeypatch.setenv("DISTQ_CACHE", str(digits_root.parent))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", CONFIG, "--world-size", "2", "train.epochs=3", "quant.w_bits=2"]) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("resnet18, 3 epochs x 11 steps (1442 train images counted, batch 64 x 2 process(es))")
    rows = lines[lines.index(next(line for line in lines if line.split()[:1] == ["epoch"])) + 1:]
    assert [row.split()[3] for row in rows] == ["2/4"] * 3
