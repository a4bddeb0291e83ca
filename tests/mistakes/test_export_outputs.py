"""Everyday mistakes around export files: an ``--out`` that would replace a file (a run's own
checkpoint above all), a write that fails half-way, and export files holding NaN."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from distq.cli import main

NEWEST = "step_00000022"


def run_files(run: Path) -> dict[str, str]:
    """sha256 of every file of the run's checkpoints/, results.json and config.yaml."""
    paths = [p for p in sorted((run / "checkpoints").rglob("*")) if p.is_file()] + [run / "results.json", run / "config.yaml"]
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("distq: error: "), captured.err
    return lines[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_run) -> Path:
    """The tiny run exported once (safetensors), for the tests to copy."""
    out = tmp_path_factory.mktemp("exported") / "tiny.safetensors"
    assert main(["export", str(tiny_run), "--out", str(out)]) == 0
    return out


# --- case 1: --out never replaces a file without --force, never a checkpoint at all -----------


def test_export_refuses_an_existing_file_unless_forced(tiny_run, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"someone's work")
    assert main(["export", str(tiny_run), "--out", str(out)]) == 2
    assert one_error_line(capsys) == f"distq: error: '{out}' already exists: pass --force to replace it, or choose another --out"
    assert out.read_bytes() == b"someone's work"
    assert main(["export", str(tiny_run), "--out", str(out), "--force"]) == 0
    assert out.read_bytes()[8:10] == b'{"'  # now an export (safetensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temporary file left


def test_export_never_writes_among_a_runs_checkpoints_even_forced(tiny_run, tmp_path, run_distq, capsys):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    checkpoints = run / "checkpoints"
    state = checkpoints / NEWEST / "state.pt"
    before = run_files(run)

    proc = run_distq("export", run, "--out", state, "--force")  # the user's mistake, through the real CLI
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"distq: error: refusing to write '{state}': it is inside '{checkpoints / NEWEST}', a training run's checkpoints, "
        "which an export must not replace or mix with (--force does not change this); write it elsewhere, e.g. RUN_DIR/model.safetensors"
    ]
    assert run_files(run) == before

    link = tmp_path / "looks-harmless.safetensors"
    link.symlink_to(state)
    for out, fmt in (
        (checkpoints / "model.safetensors", "safetensors"),  # new file in checkpoints/
        (checkpoints / "step_00000011" / ".." / NEWEST / "state.pt", "onnx"),
        (link, "safetensors"),  # a link to a checkpoint file
    ):
        assert main(["export", str(run), "--format", fmt, "--out", str(out), "--force"]) == 2
        assert "a training run's checkpoints, which an export must not replace" in one_error_line(capsys)
    assert run_files(run) == before
    assert main(["eval", str(run)]) == 0  # the newest checkpoint is still there and whole: nothing passed over
    assert [line for line in capsys.readouterr().err.splitlines() if not line.startswith("distq: note:")] == []


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary_one(tiny_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model.safetensors"

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    assert main(["export", str(tiny_run), "--out", str(out)]) == 2
    assert one_error_line(capsys) == f"distq: error: cannot write '{out}': {os.strerror(errno.ENOSPC)}"
    assert list(tmp_path.iterdir()) == []


# --- case 4: an export file holding NaN is refused by the engines that run it -----------------


def test_a_safetensors_export_with_nan_is_refused_by_eval_and_predict(exported, tmp_path, digits_root, capsys):
    import torch

    from distq.export.format import ExportFile, from_bytes, to_bytes

    good = from_bytes(exported.read_bytes())
    name = next(n for n in sorted(good.tensors) if n.endswith(".out_scale"))
    tensors = dict(good.tensors)
    tensors[name] = tensors[name].clone()
    tensors[name][0] = float("nan")
    bad = tmp_path / "diverged.safetensors"
    bad.write_bytes(to_bytes(ExportFile(good.header, tensors)))  # a fresh checksum: only the NaN check can tell
    refused_by_eval_and_predict("int", bad, f"export file '{bad}'", name, digits_root, capsys)
    assert torch.isnan(tensors[name]).any()


def test_an_onnx_export_with_nan_is_refused_by_eval_and_predict(tiny_run, tmp_path, digits_root, capsys):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import numpy as np
    from onnx import numpy_helper

    good = tmp_path / "tiny.onnx"
    assert main(["export", str(tiny_run), "--format", "onnx", "--out", str(good)]) == 0
    capsys.readouterr()
    model = onnx.load(str(good))
    index, init = next((i, t) for i, t in enumerate(model.graph.initializer) if numpy_helper.to_array(t).dtype == np.float32)
    array = numpy_helper.to_array(init).copy()
    array.flat[0] = np.inf
    model.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, init.name))
    bad = tmp_path / "diverged.onnx"
    onnx.save(model, str(bad))
    refused_by_eval_and_predict("onnx", bad, f"ONNX file '{bad}'", init.name, digits_root, capsys)


def refused_by_eval_and_predict(engine: str, bad, what: str, tensor: str, digits_root, capsys) -> None:
    """``eval --engine ENGINE`` and ``predict`` of the export file ``bad`` each refuse it in one line."""
    image = next((digits_root / "val" / "digit_0").iterdir())
    for argv in (["eval", "--engine", engine, str(bad)], ["predict", str(bad), str(image)]):
        assert main(argv) == 2, argv
        assert one_error_line(capsys) == (
            f"distq: error: {what} cannot be used: 1 tensor holds NaN or infinite values ({tensor}): the model it was "
            "exported from diverged; export an earlier checkpoint (RUN_DIR/checkpoints/step_*), or train again with a "
            "lower train.lr"
        ), argv
