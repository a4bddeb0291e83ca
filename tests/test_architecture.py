"""The architecture holds as a check: layers import only downward, no import cycles, and the
linters see every file (no package folder is named like build output)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python_files(*folders: str) -> set[Path]:
    return {p for folder in folders for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts}


def test_import_contracts_hold():
    """pyproject.toml's import-linter contracts: the layers and no cycles between siblings."""
    lint = Path(sys.executable).parent / "lint-imports"
    command = [str(lint)] if lint.exists() else [shutil.which("lint-imports") or "lint-imports"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([*command, "--no-cache"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in proc.stdout


def test_every_module_of_the_package_has_a_layer():
    """A module left out of the layers contract would be free to import anything."""
    import tomllib

    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contracts if c["type"] == "layers")
    layered = {name.strip() for layer in layers for name in layer.split("|")}
    children = {f"distq.{p.stem}" for p in (REPO / "distq").iterdir() if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.stem != "__init__"}
    assert children - layered == set()


def test_no_package_folder_is_named_like_build_output():
    folders = {p.name for p in (REPO / "distq").rglob("*") if p.is_dir()} | {p.name for p in (REPO / "tests").rglob("*") if p.is_dir()}
    assert not folders & {"dist", "build"}


def test_ruff_checks_every_python_file():
    ruff = Path(sys.executable).parent / "ruff"
    command = [str(ruff)] if ruff.exists() else [shutil.which("ruff") or "ruff"]
    proc = subprocess.run([*command, "check", "--show-files", "distq", "tests"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    shown = {Path(line.strip()).resolve() for line in proc.stdout.splitlines() if line.strip().endswith(".py")}
    assert shown == python_files("distq", "tests")


def test_the_layer_contract_ignores_no_import():
    """docs/architecture.md says the contract has no exceptions."""
    assert "ignore_imports" not in (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
