"""Everyday mistakes on the reading side (``distq eval``, ``distq export``, ``distq predict``):
a damaged, diverged or foreign checkpoint, a dataset with other classes, a folder given for a
file. Each ends as one ``distq: error:`` line (exit 2) that names the file and what to do, or,
where distq can go on, says on stderr what it passed over; nothing of the run is changed."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import torch

from distq.checkpoint import CheckpointStore
from distq.checkpoint.files import file_record
from distq.checkpoint.manifest import LATEST, MANIFEST, read_manifest, write_manifest
from distq.cli import main

NEWEST, OLDER = "step_00000022", "step_00000011"
WEIGHT = "conv1.weight"


def run_files(run: Path) -> dict[str, str]:
    """sha256 of every file of the run's checkpoints/, results.json and config.yaml."""
    paths = [p for p in sorted((run / "checkpoints").rglob("*")) if p.is_file()] + [run / "results.json", run / "config.yaml"]
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def overwrite_weight(state_file: Path, value: float, name: str = WEIGHT) -> None:
    """Write ``value`` over every element of model weight ``name`` inside the file, in place: the zip
    stays valid and the same size, so torch reads it without a complaint."""
    weight = torch.load(state_file, map_location="cpu", weights_only=True)["models"]["model"][name].contiguous()
    data = bytearray(state_file.read_bytes())
    old = weight.numpy().tobytes()
    assert data.count(old) == 1
    at = data.index(old)
    data[at : at + len(old)] = torch.full_like(weight, value).numpy().tobytes()
    state_file.write_bytes(bytes(data))


def rerecord(folder: Path) -> None:
    """Rewrite the manifests (the checkpoint's and latest.json) with the files' present sizes and
    sha256: the checkpoint looks intact to every check but the one on its values."""
    manifest = read_manifest(folder / MANIFEST)
    manifest.files = {name: file_record(folder / name) for name in manifest.files}
    write_manifest(folder / MANIFEST, manifest)
    if read_manifest(folder.parent / LATEST).tag == manifest.tag:
        write_manifest(folder.parent / LATEST, manifest)


def without_notes(stderr: str) -> list[str]:
    """The lines of ``stderr`` but a note that the native kernels could not be built (no compiler)."""
    return [line for line in stderr.splitlines() if not line.startswith("distq: note:")]


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("distq: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


# --- case 2: a damaged newest checkpoint is passed over, and said -----------------------------


def test_eval_and_export_say_which_damaged_checkpoint_they_passed_over(tiny_run, tmp_path, run_distq, capsys):
    run = copy_run(tiny_run, tmp_path)
    overwrite_weight(run / "checkpoints" / NEWEST / "state.pt", 0.0)
    said = f"distq: checkpoint {NEWEST} cannot be used: state.pt does not match its checksum (damaged); using {OLDER}"

    proc = run_distq("eval", run)
    assert proc.returncode == 0, proc.stderr
    assert without_notes(proc.stderr) == [said]
    assert set(json.loads(proc.stdout)) == {"val/top1", "val/top5"}  # stdout keeps only the results

    out = tmp_path / "model.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert without_notes(captured.err) == [said]
    assert captured.out.startswith(f"exported {out}: ")


# --- case 3: a checkpoint folder (or its state.pt) is checked against its manifest -------------


def test_a_damaged_checkpoint_folder_or_its_state_file_is_refused(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path)
    folder = run / "checkpoints" / NEWEST
    overwrite_weight(folder / "state.pt", 0.0)  # one weight tensor zeroed: the zip is still valid
    before = run_files(run)
    out = tmp_path / "model.safetensors"
    for argv in (
        ["eval", str(folder)],
        ["eval", str(folder / "state.pt")],
        ["export", str(folder), "--out", str(out)],
        ["export", str(folder / "state.pt"), "--format", "onnx", "--out", str(out)],
    ):
        assert main(argv) == 2, argv
        assert one_error_line(capsys) == (
            f"distq: error: checkpoint {folder} cannot be used: state.pt does not match its checksum (damaged); "
            "pass the run directory to use its newest complete checkpoint, or restore the files from a copy"
        ), argv
    assert not out.exists()
    assert run_files(run) == before


# --- case 4: a diverged checkpoint (NaN weights) is refused by every reader ------------------


def test_a_checkpoint_with_nan_weights_is_refused_by_eval_and_every_export_format(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path)
    folder = run / "checkpoints" / NEWEST
    overwrite_weight(folder / "state.pt", float("nan"))
    rerecord(folder)
    found = CheckpointStore(run).find()
    assert found.folder == folder and found.skipped == []  # only the check of the values can catch it
    out = tmp_path / "model.out"
    for argv in (
        ["eval", str(run)],
        ["eval", str(folder)],
        ["export", str(run), "--out", str(out)],
        ["export", str(run), "--format", "onnx", "--out", str(out)],
        ["export", str(run), "--format", "qonnx", "--out", str(out)],
    ):
        assert main(argv) == 2, argv
        assert one_error_line(capsys) == (
            f"distq: error: checkpoint '{folder / 'state.pt'}' cannot be used: 1 tensor holds NaN or infinite values "
            "(model.conv1.weight): the run diverged; evaluate or export an earlier checkpoint (RUN_DIR/checkpoints/step_*), "
            "or train again with a lower train.lr"
        ), argv
    assert not out.exists()


# --- case 5: a dataset with other classes: the message names the difference -----------------


def test_a_dataset_with_other_classes_is_named_by_its_difference(tiny_run, tmp_path, make_image_folder, capsys):
    root = make_image_folder(tmp_path / "data", classes=("digit_0", "digit_1", "seven", "zebra"), per_class=1)
    before = run_files(tiny_run)
    assert main(["eval", str(tiny_run), "--data", str(root)]) == 2
    assert one_error_line(capsys) == (
        f"distq: error: dataset '{root}' has 4 classes but checkpoint '{tiny_run}' was trained on 10: 8 of them missing "
        "from the data (digit_2, digit_3, digit_4, ...); 2 extra in the data (seven, zebra): evaluate on a dataset "
        "with the same class folders"
    )
    assert run_files(tiny_run) == before


# --- case 6: a pickle of arbitrary objects: never advise weights_only=False -------------------


def test_a_pickle_of_python_objects_is_not_a_checkpoint_and_no_unsafe_load_is_advised(tiny_run, tmp_path, run_distq):
    run = copy_run(tiny_run, tmp_path)
    before = run_files(run)
    pickled = tmp_path / "args.pt"  # a training script's habit: its argparse Namespace saved beside the weights
    torch.save({"config": {}, "models": {}, "args": argparse.Namespace(lr=0.1)}, pickled, pickle_protocol=4)
    proc = run_distq("eval", pickled)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"distq: error: checkpoint '{pickled}' is not a distq checkpoint: it holds Python objects other than tensors "
        "(argparse.Namespace), which distq never saves and which cannot be loaded safely; pass a run directory or a checkpoint folder "
        "written by 'distq train' (RUN_DIR/checkpoints/step_*)"
    ]
    assert "weights_only" not in proc.stderr and proc.stdout == ""
    assert run_files(run) == before


# --- case 7: a folder where a file is expected, and the reverse ------------------------------


def test_a_folder_for_a_file_and_a_file_for_a_folder_are_said_plainly(tiny_run, tmp_path, capsys):
    folder = tiny_run / "checkpoints" / NEWEST
    plain = tmp_path / "plain"
    plain.mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    cases = {
        ("eval", "--engine", "int", str(tiny_run)): (
            f"distq: error: export file '{tiny_run}' is a directory holding a training checkpoint, not an export file: "
            f"evaluate it with 'distq eval {tiny_run}' (no --engine), or export it first with 'distq export {tiny_run} --out FILE'"
        ),
        ("predict", str(folder), "x.jpg"): (
            f"distq: error: export file '{folder}' is a directory holding a training checkpoint, not an export file: "
            f"evaluate it with 'distq eval {folder}' (no --engine), or export it first with 'distq export {folder} --out FILE'"
        ),
        ("eval", "--engine", "onnx", str(plain)): (
            f"distq: error: ONNX file '{plain}' is a directory, not an export file: give the path of a file written by 'distq export'"
        ),
        ("predict", str(plain), "x.jpg"): (
            f"distq: error: export file '{plain}' is a directory, not an export file: give the path of a file written by 'distq export'"
        ),
        ("eval", str(notes)): (
            f"distq: error: checkpoint '{notes}' is corrupt or not a distq checkpoint: not a file written by torch.save, nor a "
            "run directory or checkpoint folder; pass a run directory or a checkpoint folder written by 'distq train' "
            "(RUN_DIR/checkpoints/step_*)"
        ),
        ("eval", str(plain)): (
            f"distq: error: {plain} is not a run directory or checkpoint folder: it holds no checkpoint; pass a run "
            "directory or a checkpoint folder written by 'distq train' (RUN_DIR/checkpoints/step_*)"
        ),
        ("export", str(tiny_run), "--out", str(plain)): (
            f"distq: error: cannot write '{plain}': it is a directory; give the name of the file to write"
        ),
    }
    for argv, line in cases.items():
        assert main(list(argv)) == 2, argv
        assert one_error_line(capsys) == line, argv
    assert list(plain.iterdir()) == []
