"""Progress on a terminal is tqdm's bar; in a log file (SLURM), plain lines, never carriage returns."""

from __future__ import annotations

import re

import pytest

from distq import progress as progress_module
from distq.progress import Progress


def test_without_a_terminal_one_plain_line_every_n_units_and_at_the_end(capsys):
    with Progress(25, "pack train", every=10, unit="image") as bar:
        for _ in range(25):
            bar.update()
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [re.match(r"pack train: (\d+)/25 images", line)[1] for line in lines] == ["10", "20", "25"]
    assert "\r" not in out + err and err == ""
    assert re.fullmatch(r"pack train: 25/25 images \(100%\), [\d.e+]+ images/s, 0:\d\d elapsed", lines[-1])


def test_lines_carry_the_postfix_and_an_eta_and_can_be_chosen_by_the_caller(capsys):
    bar = Progress(110, "epoch 2/15", every=10, unit="step", initial=40)
    bar.set_postfix(loss="0.532")
    bar.update(line=False)  # 41: the caller says no
    bar.update(3, line=True)  # 44: the caller says yes
    bar.close()
    (line,) = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"epoch 2/15: 44/110 steps \(40%\), [\d.e+]+ steps/s, 0:\d\d elapsed, eta \d+:\d\d, loss 0\.532", line)


def test_disabled_progress_prints_nothing(capsys):
    bar = Progress(3, "x", enabled=False)
    for _ in bar.wrap(range(3)):
        pass
    assert capsys.readouterr() == ("", "")


def test_on_a_terminal_the_bar_is_tqdms(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "interactive", lambda: True)
    bar = Progress(4, "verify", every=1, unit="image")
    assert bar.bar is not None
    for _ in bar.wrap(range(4)):
        pass
    bar.close()
    out, err = capsys.readouterr()
    assert out == "" and "verify" in err and "4/4" in err  # tqdm draws on standard error


@pytest.mark.parametrize("seconds,text", [(5, "0:05"), (125, "2:05"), (3725, "1:02:05")])
def test_clock(seconds, text):
    assert progress_module._clock(seconds) == text


def test_training_logged_to_a_file_has_plain_progress_lines(tmp_path, tiny_args, run_distq, digits_root):
    """``make train > log``: one line per log.every_steps steps (with the loss), no bar frames."""
    done = run_distq(*tiny_args(tmp_path / "run", "log.progress=true", "log.every_steps=5", "train.epochs=1", "train.warmup_epochs=0", "log.tensorboard=false"))
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("epoch 1/1: ")]
    assert [re.match(r"epoch 1/1: (\d+)/11 steps", line)[1] for line in lines] == ["5", "10", "11"]
    assert all(re.search(r", loss \d+\.\d{3}$", line) for line in lines)
