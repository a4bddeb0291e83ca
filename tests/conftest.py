"""Shared fixtures: the digits cache (as folders and as shards), tiny ImageNet-layout folders, and the ``distq`` CLI.

Test files have unique basenames and no ``__init__.py``, so pytest's default import mode
never confuses two of them.

Every CLI run goes through ``python -m distq`` in a subprocess (exactly what a user runs)
with ``DISTQ_CACHE`` pointing at one per-session digits copy and one intra-op thread, so
two runs side by side use the two cores of a small machine and stay deterministic.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]

# Without a GPU, Triton kernels (quant.kernels=triton) run under Triton's CPU interpreter. Set
# before anything imports a @triton.jit function (the flag is read when a kernel is defined).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
CONFIGS = REPO_ROOT / "configs"


def _cli_env(cache_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DISTQ_CACHE=str(cache_dir),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


@pytest.fixture(scope="session")
def distq_cache(tmp_path_factory) -> Path:
    """``DISTQ_CACHE`` of every CLI run of the session (the digits are written there on demand)."""
    return tmp_path_factory.mktemp("distq-cache")


@pytest.fixture(scope="session")
def digits_root(distq_cache) -> Path:
    """The embedded digits dataset, written once per session into ``distq_cache``."""
    from distq.data.digits import ensure_digits

    return ensure_digits(distq_cache)


DIGITS_SHARD_BYTES = 150_000
"""Shards of about 150 KB: the digits (1442 train images, ~2.5 KB each in a tar) in 30 train shards of ~48."""


@pytest.fixture(scope="session")
def digits_shards(digits_root, tmp_path_factory) -> Path:
    """The digits packed by ``distq data pack`` into small shards (``DIGITS_SHARD_BYTES``), once per session."""
    from distq.data.pack import pack

    out = tmp_path_factory.mktemp("digits-shards") / "shards"
    pack(digits_root, out, shard_bytes=DIGITS_SHARD_BYTES, progress=False)
    return out


@pytest.fixture(scope="session")
def run_distq(distq_cache):
    """``run_distq(*args, env=None, timeout=300)``: run ``python -m distq ARGS`` and return the
    ``CompletedProcess`` (text stdout/stderr), from the repository root."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "distq", *map(str, args)],
            cwd=REPO_ROOT,
            env=_cli_env(distq_cache, env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def start_distq(distq_cache):
    """``start_distq(*args, log=PATH, env=None)``: start ``python -m distq ARGS`` without waiting,
    stdout and stderr going to ``log``; returns the ``Popen``."""
    started: list[subprocess.Popen] = []

    def start(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "distq", *map(str, args)],
                cwd=REPO_ROOT,
                env=_cli_env(distq_cache, env),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started.append(proc)
        return proc

    yield start
    for proc in started:  # never leave a training process behind a failed test
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def tiny_train_args(run_dir: Path, *overrides: str, config: str = "digits_w4a4.yaml") -> list[str]:
    """``train`` arguments of a run that takes seconds on one CPU core: a width-4 ResNet-18
    on the digits, 11 steps per epoch, no worker processes, no progress bar."""
    return [
        "train",
        str(CONFIGS / config),
        "model.width=4",
        "data.batch_size=128",
        "data.workers=0",
        "train.epochs=2",
        "log.progress=false",
        f"run.dir={run_dir}",
        *overrides,
    ]


@pytest.fixture(scope="session")
def tiny_args():
    """The ``tiny_train_args`` helper, for test files (which cannot import conftest)."""
    return tiny_train_args


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, digits_root, run_distq) -> Path:
    """One finished tiny W2A3 run (2 epochs, TensorBoard every 5 steps); returns its run dir.

    W2/A3 (not 4/4) so that a test can tell weight bits from activation bits.
    """
    run_dir = tmp_path_factory.mktemp("tiny-run") / "run"
    proc = run_distq(*tiny_train_args(run_dir, "quant.w_bits=2", "quant.a_bits=3", "log.every_steps=5"))
    assert proc.returncode == 0, proc.stderr
    return run_dir


def write_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog"),
    per_class: int = 4,
    size: tuple[int, int] = (40, 36),
    splits: tuple[str, ...] = ("train", "val"),
    seed: int = 0,
) -> Path:
    """Write ``root/<split>/<class>/<n>.JPEG`` noise images (deterministic) and return ``root``."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels, mode="RGB").save(folder / f"{n:03d}.JPEG", quality=90)
    return root


@pytest.fixture(scope="session")
def make_image_folder():
    """``make_image_folder(root, classes=..., per_class=4, size=(40, 36), splits=("train", "val"))``."""
    return write_image_folder


def wait_for(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def training_checkpoint(path: Path) -> dict:
    """The newest complete checkpoint of a run directory (or the checkpoint folder given), its
    optimizer shards merged into whole tensors under ``"optimizer"`` and its folder under ``"folder"``."""
    from distq.checkpoint import CheckpointStore, load_state, load_tensors
    from distq.checkpoint.optimizer_state import merge
    from distq.checkpoint.store import Found, read_manifest

    path = Path(path)
    if (path / "manifest.json").is_file():
        found = Found(path, read_manifest(path / "manifest.json"))
    else:
        found = CheckpointStore(path).find()
        assert found is not None, f"{path} has no checkpoint"
    state = load_state(found.folder)
    state["optimizer"] = merge([load_tensors(p) for p in found.optimizer_paths()], str(found.folder))
    state["folder"] = found.folder
    return state


def committed_steps(run_dir: Path) -> list[int]:
    """Steps of the run's committed checkpoints (those with a manifest), ascending."""
    return sorted(int(p.parent.name[5:]) for p in (Path(run_dir) / "checkpoints").glob("step_*/manifest.json"))


def assert_same_state(a, b, where: str = "") -> None:
    """Recursively equal: tensors with torch.equal (bitwise), everything else with ==."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="session")
def checkpoint_of():
    """``checkpoint_of(run_dir_or_folder)``: see ``training_checkpoint``."""
    return training_checkpoint


@pytest.fixture(scope="session")
def steps_committed():
    """``steps_committed(run_dir)``: see ``committed_steps``."""
    return committed_steps


@pytest.fixture(scope="session")
def same_state():
    """``same_state(a, b)``: see ``assert_same_state``."""
    return assert_same_state


@pytest.fixture(scope="session")
def torchrun(distq_cache):
    """``torchrun(nproc, *args, log=PATH, env=None, wait=True, timeout=900)``: ``python -m distq ARGS``
    on ``nproc`` processes (torchrun, a free port); returns the exit status, or the ``Popen`` with wait=False."""
    import socket

    def run(nproc: int, *args: str, log: Path, env: dict[str, str] | None = None, wait: bool = True, timeout: float = 900):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}", "-m", "distq", *map(str, args)]
        with open(log, "w") as out:
            proc = subprocess.Popen(command, cwd=REPO_ROOT, env=_cli_env(distq_cache, env), stdout=out, stderr=subprocess.STDOUT)
        return proc.wait(timeout=timeout) if wait else proc

    return run


@pytest.fixture(scope="session")
def poll():
    """``poll(predicate, timeout, interval=0.02)``: wait until ``predicate()`` is true; returns it."""
    return wait_for
