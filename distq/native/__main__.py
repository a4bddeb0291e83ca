"""``python -m distq.native``: compile the kernels now (``make install`` runs this) and
say where they are and which instruction set this CPU will run."""

from __future__ import annotations

import sys

from distq.native.library import available_isas, isa, library_path, load

if __name__ == "__main__":
    lib = load()
    if lib is None:
        sys.exit(0)  # load() printed why; the engine and quantizers still work on their torch kernels
    print(f"distq: native kernels ready: {library_path(lib)} ({isa(lib)}; this CPU runs {', '.join(available_isas(lib))})")
