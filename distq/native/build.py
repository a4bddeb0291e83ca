"""Compile the native kernels (bit kernels, CPU quantizer loops) into one shared library, once
per version of the sources.

Why a plain shared library loaded with ctypes, not a torch C++ extension: the kernels only
read and write raw buffers, so they need no torch headers. That keeps a build to a few
seconds with any C++17 compiler, ties the library to no torch or Python ABI (a torch
upgrade does not invalidate it), and needs nothing at ``pip install`` time: ``make install``
compiles it right after installing the package, and the first engine or CPU quantizer that
needs it compiles it if that did not happen. Where no compiler works, both keep their torch
reference kernels (``distq.native.library``).

The library lands next to the sources (``_compiled/``) when the package folder is writable
(an editable install, as ``make install`` does), else under the distq cache
(``$DISTQ_CACHE`` or ``~/.cache/distq``). Its file name holds a digest of the sources and
flags, so an edited source is rebuilt and never mistaken for the old one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from distq.cache import default_cache_dir

SOURCE_DIR = Path(__file__).resolve().parent
HEADERS = ("bitops_api.h", "isa_table.h", "bitops_kernels.inc")
COMMON_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-ffp-contract=off")
"""-ffp-contract=off: the affine must round like the reference engine's separate multiply and
add; GCC would otherwise fuse them into one FMA on CPUs that have it."""
OPENMP_FLAG = "-fopenmp"
"""Linked against libgomp.so.1, which torch has already loaded: the kernels then share torch's
OpenMP thread pool instead of starting a second one on the same cores."""
X86_UNITS = {
    "isa_portable.cpp": (),
    "isa_avx2.cpp": ("-mavx2", "-mpopcnt"),
    "isa_avx512.cpp": (
        "-mavx512f",
        "-mavx512bw",
        "-mavx512dq",
        "-mavx512vl",
        "-mavx512vpopcntdq",
        "-mpopcnt",
        "-mprefer-vector-width=512",  # else GCC vectorises the epilogue's int64 -> double -> float chain 4 wide
    ),
    "entry.cpp": ("-DDQ_WITH_X86",),
}
PORTABLE_UNITS = {"isa_portable.cpp": (), "entry.cpp": ()}
LIBRARY_STEM = "libdistq_bitops"


class BuildError(RuntimeError):
    """The kernels could not be compiled; the message says why in one line."""


def compiler() -> str | None:
    """$CXX, else the first of g++, clang++, c++ on the PATH."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return next((found for name in ("g++", "clang++", "c++") if (found := shutil.which(name))), None)


def translation_units() -> dict[str, tuple[str, ...]]:
    """Each source file with its instruction-set flags; AVX only where x86 compilers take them."""
    return X86_UNITS if platform.machine().lower() in ("x86_64", "amd64") else PORTABLE_UNITS


def library_name(cxx: str, openmp: bool = True) -> str:
    digest = hashlib.sha256()
    for name in (*HEADERS, *translation_units()):
        digest.update(name.encode() + (SOURCE_DIR / name).read_bytes())
    digest.update(repr((cxx, COMMON_FLAGS, openmp, translation_units())).encode())
    return f"{LIBRARY_STEM}-{digest.hexdigest()[:16]}.so"


def library_dirs() -> list[Path]:
    """Where a built library may be, in the order they are searched and written."""
    return [SOURCE_DIR / "_compiled", default_cache_dir() / "native"]


def find_library(cxx: str) -> Path | None:
    for directory in library_dirs():
        for openmp in (True, False):
            path = directory / library_name(cxx, openmp)
            if path.is_file():
                return path
    return None


def build(cxx: str | None = None) -> Path:
    """The path of the compiled library, compiling it first if it is not there yet.

    Concurrent builds (two processes starting an engine at once) wait for each other on a
    lock file; the library appears under its final name only when complete."""
    cxx = cxx or compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (install g++ or set CXX)")
    found = find_library(cxx)
    if found is not None:
        return found
    directory = _writable_dir()
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = find_library(cxx)
        if found is not None:
            return found
        try:
            return _compile(cxx, directory, openmp=True)
        except BuildError:
            return _compile(cxx, directory, openmp=False)  # e.g. clang without libomp: single-threaded kernels


def _writable_dir() -> Path:
    for directory in library_dirs():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".probe")
            probe.close()
            return directory
        except OSError:
            continue
    raise BuildError(f"no writable folder for the compiled kernels (tried {', '.join(map(str, library_dirs()))})")


def _compile(cxx: str, directory: Path, openmp: bool) -> Path:
    target = directory / library_name(cxx, openmp)
    flags = [*COMMON_FLAGS, *((OPENMP_FLAG,) if openmp else ())]
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as tmp:

        def compile_unit(item):
            name, isa_flags = item
            obj = Path(tmp) / (Path(name).stem + ".o")
            _run([cxx, *flags, *isa_flags, "-c", str(SOURCE_DIR / name), "-o", str(obj)])
            return str(obj)

        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            objects = list(pool.map(compile_unit, translation_units().items()))
        linked = Path(tmp) / target.name
        _run([cxx, "-shared", *flags, *objects, "-o", str(linked)])
        os.replace(linked, target)
    return target


def _run(command: list[str]) -> None:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"{command[0]} failed to run ({exc})") from None
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()] or proc.stderr.splitlines() or ["?"]
        raise BuildError(f"{Path(command[0]).name} failed: {errors[0].strip()}")
