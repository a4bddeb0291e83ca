"""Where distq keeps what it makes once and reuses: the digits dataset, benchmark data, and the
compiled native kernels when the package folder is read-only. ``$DISTQ_CACHE``, else
``~/.cache/distq``."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    base = os.environ.get("DISTQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "distq")
    return Path(base)
