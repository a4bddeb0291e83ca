"""The README's five-minute tour runs as written: every command of its ``bash`` block, in order
(the trainings shortened to one epoch of a width-4 network by overrides appended to the line, and
the run directory and export file placed in a temporary folder)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def tour_commands() -> list[list[str]]:
    text = README.read_text()
    section = text[text.index("## A five-minute tour"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if line.strip()]


def test_the_tour_is_distq_commands():
    commands = tour_commands()
    assert len(commands) >= 6 and all(c[0] == "distq" for c in commands)


def test_the_five_minute_tour_runs(tmp_path, run_distq):
    for command in tour_commands():
        args = [a.replace("runs/tour", str(tmp_path / "tour")).replace("tour.safetensors", str(tmp_path / "tour.safetensors")) for a in command[1:]]
        if args[0] == "train" and "--help-config" not in args:
            args += ["train.epochs=1", "train.warmup_epochs=0", "model.width=4", "data.workers=0", "log.progress=false"]
        proc = run_distq(*args)
        assert proc.returncode == 0, f"{shlex.join(command)}: {proc.stderr[-2000:]}"
