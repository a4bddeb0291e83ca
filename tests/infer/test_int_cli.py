"""``distq export`` -> ``distq eval --engine int`` and ``distq predict``.

One subprocess per command, as a user runs them; the variations (JSON output, bad files)
call ``distq.cli.main`` in-process, which skips a torch import per case.
"""

from __future__ import annotations

import json
import re

import pytest

from distq.cli import main
from distq.native.library import load


@pytest.fixture(scope="module")
def exported(tmp_path_factory, run_distq, tiny_run):
    out = tmp_path_factory.mktemp("export") / "tiny.safetensors"
    proc = run_distq("export", tiny_run, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


def test_eval_int_matches_eval_float_on_the_val_split(run_distq, tiny_run, exported):
    float_proc = run_distq("eval", tiny_run)
    int_proc = run_distq("eval", "--engine", "int", exported)
    assert float_proc.returncode == 0 and int_proc.returncode == 0, int_proc.stderr + float_proc.stderr
    fp, it = json.loads(float_proc.stdout.splitlines()[-1]), json.loads(int_proc.stdout.splitlines()[-1])
    assert it["engine"] == "int" and it["images"] == 355
    assert it["kernels"].startswith("native") or load() is None  # the fast kernels by default
    # The same predictions on (nearly) every image: top-1 may differ by an image on a tie.
    assert abs(it["val/top1"] - fp["val/top1"]) <= 100 / 355 + 1e-9


def test_predict_prints_top5_names_and_probabilities(run_distq, exported, digits_root):
    images = sorted((digits_root / "val" / "digit_3").iterdir())[:2]
    proc = run_distq("predict", exported, *images)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(images[0]) and lines[6] == str(images[1])
    ranked = [re.fullmatch(r"\s+(\d)\. (digit_\d)\s+([\d.]+)", line) for line in lines[1:6]]
    assert [int(m.group(1)) for m in ranked] == [1, 2, 3, 4, 5]
    probs = [float(m.group(3)) for m in ranked]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_predict_json(exported, digits_root, capsys):
    image = sorted((digits_root / "val" / "digit_0").iterdir())[0]
    assert main(["predict", "--json", str(exported), str(image)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["image"] == str(image) and len(record["top5"]) == 5
    assert {r["class"] for r in record["top5"]} <= {f"digit_{i}" for i in range(10)}


def test_corrupt_export_is_one_error_line(exported, tmp_path, capsys):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(exported.read_bytes()[:-100])
    size = exported.stat().st_size
    for args in (["eval", "--engine", "int", str(broken)], ["predict", str(broken), "x.jpg"]):
        assert main(args) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"distq: error: export file '{broken}' is truncated: its tensors need {size} bytes but the file has {size - 100}"
        ]


def test_eval_int_on_a_checkpoint_says_it_is_not_an_export(tiny_run, capsys):
    checkpoint = tiny_run / "checkpoints" / "step_00000022" / "state.pt"
    assert main(["eval", "--engine", "int", str(checkpoint)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"export file '{checkpoint}' is truncated or not a distq export" in err[0]


def test_eval_int_on_a_dataset_with_other_classes_is_one_error_line(exported, make_image_folder, tmp_path, capsys):
    root = make_image_folder(tmp_path / "pets", classes=("cat", "dog"), per_class=2)
    assert main(["eval", "--engine", "int", str(exported), "--data", str(root)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"dataset '{root}' has 2 classes but export file '{exported}' was trained on 10" in err[0]
    assert "10 of them missing from the data (digit_0, digit_1, digit_2, ...); 2 extra in the data (cat, dog)" in err[0]
    assert "evaluate on a dataset with the same class folders" in err[0]
