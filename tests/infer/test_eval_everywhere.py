"""One evaluation: a model trained on shards is evaluated on its shards by ``distq eval`` from
the checkpoint, from the packed export on the integer engine, and from the ONNX export on
onnxruntime, with the same top-1 (the export records where its data is and in which format)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def shards_run(tmp_path_factory, digits_shards, run_distq, tiny_args):
    run_dir = tmp_path_factory.mktemp("shards-eval") / "run"
    proc = run_distq(*tiny_args(run_dir, f"data.root={digits_shards}", "data.format=shards", "train.epochs=2", "quant.w_bits=4", "quant.a_bits=4"))
    assert proc.returncode == 0, proc.stderr
    return run_dir


def eval_json(run_distq, *args) -> dict:
    proc = run_distq("eval", *map(str, args))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_shards_run_evaluates_the_same_from_its_checkpoint_and_both_exports(shards_run, run_distq, tmp_path, digits_shards):
    checkpoint = eval_json(run_distq, shards_run)
    packed, onnx = tmp_path / "m.safetensors", tmp_path / "m.onnx"
    for out, fmt in ((packed, "safetensors"), (onnx, "onnx")):
        proc = run_distq("export", shards_run, "--out", out, "--format", fmt)
        assert proc.returncode == 0, proc.stderr
    by_engine = eval_json(run_distq, "--engine", "int", packed)
    by_onnx = eval_json(run_distq, "--engine", "onnx", onnx)
    assert by_engine["images"] == by_onnx["images"] == 355
    # The engines agree with the fake-quantized model on all but the odd image at a rounding boundary.
    assert abs(by_engine["val/top1"] - checkpoint["val/top1"]) <= 100 / 355 + 1e-9
    assert abs(by_onnx["val/top1"] - checkpoint["val/top1"]) <= 100 / 355 + 1e-9
    # An explicit --data root gives the same numbers.
    assert eval_json(run_distq, "--engine", "int", packed, "--data", digits_shards)["val/top1"] == by_engine["val/top1"]


def test_the_transform_the_class_check_and_the_topk_loop_each_exist_once():
    """No second validation transform, class comparison or top-k counting loop in distq/."""
    import re
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "distq"
    found = {"transform": [], "class check": [], "top-k loop": []}
    patterns = {"transform": r"T\.CenterCrop\(|def val_transform\(", "class check": r"def check_same_classes\(|classes\(.*\) != ", "top-k loop": r"def topk_correct\(|\.eq\(labels"}
    for path in package.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for what, pattern in patterns.items():
                if re.search(pattern, line):
                    found[what].append(f"{path.relative_to(package)}:{number}")
    assert len(found["transform"]) == 2 and all(p.startswith("data/transforms.py") for p in found["transform"]), found
    assert [p.split(":")[0] for p in found["class check"]] == ["evaluate.py"], found
    assert sorted({p.split(":")[0] for p in found["top-k loop"]}) == ["models/evaluation.py"], found


@pytest.mark.parametrize("make", ["missing", "no_val"])
def test_a_wrong_data_root_is_one_line_naming_the_option(make, tmp_path):
    from distq.config.schema import DataConfig
    from distq.errors import DistqError
    from distq.evaluate import val_split

    root = tmp_path / "data"
    if make == "no_val":
        (root / "train").mkdir(parents=True)
    with pytest.raises(DistqError, match=r"^--data '.*data' (does not exist|has no val/ folder and is not a shards folder)"):
        val_split(DataConfig(), str(root))


def test_evaluation_needs_only_the_validation_split(tmp_path, digits_root):
    """A root with val/ alone (a deployment machine) is enough: the classes are val/'s folders."""
    import shutil

    from distq.config.schema import DataConfig
    from distq.evaluate import val_classes, val_split

    root = tmp_path / "only-val"
    shutil.copytree(digits_root / "val", root / "val")
    data = val_split(DataConfig(), str(root))
    assert data.format == "folders"
    assert val_classes(data, root) == sorted(p.name for p in (digits_root / "train").iterdir())
