"""``distq export --format onnx|qonnx`` on a trained checkpoint, the file in a process that has
neither distq nor torch, ``distq eval --engine onnx`` and ``distq predict FILE.onnx``, and the
one-line errors for what cannot be exported or written."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from distq.cli import main

STANDALONE = r"""
import json, sys
import numpy as np
import onnxruntime as ort

model, images, out = sys.argv[1:4]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
logits = session.run(None, {session.get_inputs()[0].name: np.load(images)})[0]
np.save(out, logits)
print(json.dumps({
    "classes": json.loads(meta["classes"]),
    "preprocess": json.loads(meta["preprocess"]),
    "providers": session.get_providers(),
    "imported": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "distq")),
}))
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory, run_distq, tiny_run):
    folder = tmp_path_factory.mktemp("onnx-export")
    files = {}
    for fmt in ("onnx", "qonnx"):
        files[fmt] = folder / f"tiny.{fmt}.onnx"
        proc = run_distq("export", tiny_run, "--format", fmt, "--out", files[fmt])
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"exported {files[fmt]}: ") and f"{fmt} (opset 13)" in proc.stdout
    return files


def val_batch(digits_root, n: int = 6) -> tuple[torch.Tensor, list[str]]:
    from distq.data.folder import load_rgb
    from distq.data.transforms import val_transform

    paths = [sorted((digits_root / "val" / f"digit_{d}").iterdir())[0] for d in range(n)]
    transform = val_transform(32, 1.0)
    return torch.stack([transform(load_rgb(p)) for p in paths]), [str(p) for p in paths]


def test_file_runs_in_onnxruntime_without_distq_or_torch(exports, tiny_run, digits_root, tmp_path):
    from distq.infer.verify import reference_model

    onnx.checker.check_model(str(exports["onnx"]), full_check=True)
    batch, _ = val_batch(digits_root)
    np.save(tmp_path / "images.npy", batch.numpy())
    proc = subprocess.run(
        [sys.executable, "-c", STANDALONE, str(exports["onnx"]), str(tmp_path / "images.npy"), str(tmp_path / "logits.npy")],
        cwd=tmp_path,  # not the repository: nothing of distq on the import path
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["imported"] == [] and report["providers"] == ["CPUExecutionProvider"]
    assert report["classes"] == [f"digit_{d}" for d in range(10)]
    assert report["preprocess"]["image_size"] == 32 and report["preprocess"]["resize"] == 32
    model, _ = reference_model(str(tiny_run))
    with torch.no_grad():
        expected = model(batch).numpy()
    got = np.load(tmp_path / "logits.npy")
    assert (got.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_eval_engine_onnx_matches_eval_of_the_checkpoint(exports, tiny_run, capsys):
    assert main(["eval", str(tiny_run)]) == 0
    fp = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert main(["eval", "--engine", "onnx", str(exports["onnx"])]) == 0
    got = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert got["engine"] == "onnx" and got["images"] == 355
    assert abs(got["val/top1"] - fp["val/top1"]) <= 100 / 355 + 1e-9


def test_predict_runs_onnx_files_in_onnxruntime(exports, digits_root, capsys):
    _, paths = val_batch(digits_root, 2)
    assert main(["predict", "--json", str(exports["onnx"]), *paths]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in records] == paths
    assert all(len(r["top5"]) == 5 and r["top5"][0]["probability"] >= r["top5"][1]["probability"] for r in records)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("distq: error: "), err
    return err[0]


def test_qonnx_file_given_to_onnxruntime_says_what_to_do(exports, capsys):
    assert main(["predict", str(exports["qonnx"]), "x.jpg"]) == 2
    assert "is a QONNX export (Quant nodes), which onnxruntime cannot run: export with --format onnx" in one_error_line(capsys)


def test_unknown_format_is_one_error_line(tiny_run, tmp_path, capsys):
    assert main(["export", str(tiny_run), "--format", "tflite", "--out", str(tmp_path / "m.tflite")]) == 2
    assert one_error_line(capsys) == "distq: error: unknown export format 'tflite': choose one of safetensors, onnx, onnx-int, qonnx"


def test_unwritable_output_is_one_error_line(tiny_run, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["export", str(tiny_run), "--format", "onnx", "--out", str(blocker / "m.onnx")]) == 2
    assert one_error_line(capsys) == f"distq: error: cannot write '{blocker / 'm.onnx'}': '{blocker}' is a file, not a folder"
    assert main(["export", str(tiny_run), "--format", "onnx", "--out", str(tmp_path)]) == 2
    assert "it is a directory; give the name of the file to write" in one_error_line(capsys)


def test_checkpoint_onnx_cannot_express_is_one_error_line(tmp_path_factory, run_distq, tiny_args):
    """AQE's 2-bit activations threshold each image at half its mean |x|: refused, through the real CLI."""
    run_dir = tmp_path_factory.mktemp("aqe") / "run"
    proc = run_distq(*tiny_args(run_dir, config="digits_resnet18_w1a2_aqe.yaml"))
    assert proc.returncode == 0, proc.stderr
    out = run_dir / "aqe.onnx"
    proc = run_distq("export", run_dir, "--format", "onnx", "--out", out)
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.splitlines() == [
        "distq: error: cannot export layer 'relu' to ONNX: its 2-bit AQE activation is a ternary threshold computed per "
        "image (0.5 * mean|x| of each sample), which ONNX's fixed scales cannot express; export it with --format "
        "safetensors and run it with 'distq eval --engine int'"
    ]


def test_eval_engine_onnx_on_a_safetensors_file_is_one_error_line(tiny_run, tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    assert main(["export", str(tiny_run), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--engine", "onnx", str(out)]) == 2
    assert f"ONNX file '{out}' cannot be run by onnxruntime" in one_error_line(capsys)


def test_export_help_names_the_formats_and_the_opset(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ("safetensors, onnx, onnx-int, qonnx (default: safetensors)", "opset 13", "QuantizeLinear -> Clip -> DequantizeLinear", "distq[deploy]", "--no-fold-bn"):
        assert words in text
