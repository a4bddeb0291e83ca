"""Progress for long loops: a tqdm bar on a terminal, one plain line every so often elsewhere.

A batch system writes standard output to a file (SLURM's ``slurm-<job>.out``), where a bar's
carriage-return frames pile up into one unreadable line per refresh. So the bar is drawn only
when standard output and standard error are both terminals; otherwise ``Progress`` prints one
line every ``every`` units (and at the end) to standard output, e.g.::

    epoch 2/15: 40/110 steps (36%), 12.3 steps/s, 0:03 elapsed, eta 0:06, loss 0.532

The training loop and the ``distq data`` commands both report through it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm


def interactive() -> bool:
    """True when a person watches: standard output and standard error are terminals."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Counts ``total`` units from ``initial``; ``every``: units between plain lines (no terminal).

    ``enabled=False`` shows nothing; ``leave``: whether the bar stays on the terminal after ``close``.
    """

    def __init__(self, total: int, desc: str, every: int = 1, unit: str = "it", initial: int = 0, enabled: bool = True, leave: bool = True):
        self.total, self.desc, self.every, self.unit = total, desc, max(1, every), unit
        self.n = self.start = initial
        self.enabled = enabled
        self.postfix: dict[str, str] = {}
        self.started = time.perf_counter()
        self.bar = None
        if enabled and interactive():
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
        self.printed_at = initial

    def update(self, n: int = 1, line: bool | None = None) -> None:
        """Count ``n`` more units. Without a terminal a line is printed when the count passes a
        multiple of ``every`` or reaches ``total``, or as ``line`` says when it is given."""
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        if line is None:
            line = self.n // self.every > self.printed_at // self.every or self.n >= self.total
        if self.enabled and line:
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = {key: str(value) for key, value in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)

    def wrap(self, iterable: Iterable) -> Iterator:
        """The items of ``iterable``, counting one unit per item (after the caller is done with it)."""
        for item in iterable:
            yield item
            self.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self) -> str:
        """The plain progress line as it stands."""
        elapsed = time.perf_counter() - self.started
        done = self.n - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}s ({100 * self.n / max(self.total, 1):.0f}%)", f"{rate:.3g} {self.unit}s/s", f"{_clock(elapsed)} elapsed"]
        if 0 < self.n < self.total and rate > 0:
            parts.append(f"eta {_clock((self.total - self.n) / rate)}")
        parts += [f"{key} {value}" for key, value in self.postfix.items()]
        return ", ".join(parts)

    def _line(self) -> None:
        self.printed_at = self.n
        print(self.line(), flush=True)
