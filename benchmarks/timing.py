"""What the speed benchmarks share: interleaved timing, the machine's name, BENCHMARKS.md sections.

Timings on a machine shared with other jobs drift and jump, so every benchmark times all
its variants in one process, round-robin (one call of each per round, the order rotated
each round), and reports the median over rounds of the per-round ratio to the baseline.
On CPU each call is timed twice: wall clock, and CPU time of this process. With one
intra-op thread (the default of the CPU benchmarks) CPU time does not count the time the
process waited for a core, so its ratios are the steadier figures when the machine is busy.
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
REPORT = REPO_ROOT / "BENCHMARKS.md"
CLOCKS = ("wall", "cpu")


@dataclass
class Timings:
    """Seconds per call of each variant, one entry per round, on each clock."""

    runs: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def median(self, name: str, clock: str = "cpu") -> float:
        return statistics.median(self.runs[name][clock])

    def ratio(self, name: str, base: str, clock: str = "cpu") -> float:
        """Median over rounds of time(name) / time(base) within the round."""
        return statistics.median(a / b for a, b in zip(self.runs[name][clock], self.runs[base][clock]))


def time_interleaved(
    variants: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    min_sample_s: float = 0.0,
    sync: Callable[[], None] | None = None,
    cpu_clock: Callable[[], float] = time.process_time,
) -> Timings:
    """Call each variant ``warmup`` times, then ``rounds`` times round-robin, and return the
    seconds per call. A sample is as many back-to-back calls as make the first variant take
    ``min_sample_s`` (the same count for every variant), so that short calls are not lost in
    timer and scheduler noise. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each
    clock reading; ``cpu_clock`` is the CPU-time clock (e.g. ``cpu_seconds_with_children`` when
    worker processes do part of the work)."""
    sync = sync or (lambda: None)
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    names = list(variants)
    sync()
    start = time.perf_counter()
    variants[names[0]]()
    sync()
    number = max(1, math.ceil(min_sample_s / max(time.perf_counter() - start, 1e-9)))
    timings = Timings({name: {clock: [] for clock in CLOCKS} for name in variants})
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = variants[name]
            sync()
            wall, cpu = time.perf_counter(), cpu_clock()
            for _ in range(number):
                fn()
            sync()
            timings.runs[name]["wall"].append((time.perf_counter() - wall) / number)
            timings.runs[name]["cpu"].append((cpu_clock() - cpu) / number)
    return timings


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), {gpu}"


def context_lines(command: str, threads: int | None, load_before: float) -> list[str]:
    """The machine / versions / command bullet lines every section starts with."""
    load_after = os.getloadavg()[0]
    busy = "busy with other jobs" if max(load_before, load_after) > 1.0 else "idle"
    thread_note = f"; {threads} intra-op thread(s)" if threads else ""
    return [
        f"- Machine: {machine()}{thread_note}. Load average {load_before:.1f} before, {load_after:.1f} after ({busy}).",
        f"- Versions: torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}.",
        f"- Command: `{command}`",
    ]


def utc_now() -> str:
    return f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"


def write_section(title: str, body: str, path: Path = REPORT) -> Path:
    """Write ``## {title} ({UTC time})`` and ``body`` in place of that title's section of
    BENCHMARKS.md (up to the next ``## ``), or append them; other sections stay byte for byte."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\nMeasured numbers, each with the machine and the exact command behind it.\n"
    section = f"## {title} ({utc_now()})\n\n" + body.strip("\n") + "\n"
    pattern = re.compile(rf"^## {re.escape(title)} \(\d{{4}}-\d\d-\d\d [^)]*\)\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    return path


def set_threads(threads: int | None) -> int:
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
