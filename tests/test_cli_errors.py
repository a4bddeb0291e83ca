"""Bad input through the real CLI: one ``distq: error:`` line that names the problem, no traceback.

The cases run as ``python -m distq`` subprocesses, two at a time, in one module fixture
(each pays for importing torch), and each test checks one outcome.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torchvision

CONFIG = "configs/digits_w4a4.yaml"  # subprocesses run from the repository root
CONFIG_PATH = str(Path(__file__).resolve().parents[1] / CONFIG)  # in-process runs may not
# A model and data small enough that reaching the failing step takes a moment.
TINY = ("model.width=4", "data.batch_size=2", "data.workers=0", "train.epochs=2")


def progress_off(*args: str) -> tuple[str, ...]:
    return (*args, "log.progress=false")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, make_image_folder, tiny_run, digits_root):
    """Every bad (and one good) input the cases below need, by name."""
    base = tmp_path_factory.mktemp("bad-inputs")
    paths: dict[str, Path] = {"run": tiny_run, "tmp": base}

    empty_class = make_image_folder(base / "empty_class", per_class=2, size=(32, 32))
    (empty_class / "train" / "zebra").mkdir()
    (empty_class / "train" / "zebra" / "README.txt").write_text("no images")
    paths["empty_class"] = empty_class

    corrupt = make_image_folder(base / "corrupt", per_class=2, size=(32, 32))
    (corrupt / "train" / "cat" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg " * 8)
    paths["corrupt"] = corrupt

    truncated = make_image_folder(base / "truncated", per_class=2, size=(64, 64))
    whole = (truncated / "train" / "dog" / "000.JPEG").read_bytes()
    (truncated / "train" / "dog" / "cut.JPEG").write_bytes(whole[: len(whole) * 2 // 3])
    paths["truncated"] = truncated

    resnet50 = base / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), resnet50)
    paths["resnet50"] = resnet50

    random_bytes = base / "random.pt"
    random_bytes.write_bytes(os.urandom(4096))
    paths["random_ckpt"] = random_bytes
    return paths


def cases(p: dict[str, Path]) -> dict[str, tuple[tuple[str, ...], str]]:
    """name -> (CLI arguments, regular expression the error message must match)."""
    def train(name: str) -> tuple[str, ...]:  # each case its own run.dir: two run at once
        return ("train", CONFIG, f"run.dir={p['tmp'] / ('run-' + name)}")

    return {
        "unknown_key": ((*train("unknown_key"), "train.epcohs=3"), r"unknown config key 'train\.epcohs': did you mean 'train\.epochs'\?"),
        "bits_9": ((*train("bits_9"), "quant.w_bits=9"), r"quant\.w_bits=9 is not a valid bit-width: use 1\.\.8, or 32"),
        "missing_root": ((*train("missing_root"), "data.root=/nonexistent"), r"dataset folder '/nonexistent' does not exist"),
        "empty_class": (
            (*train("empty_class"), *TINY, f"data.root={p['empty_class']}"),
            rf"class folder '{re.escape(str(p['empty_class'] / 'train' / 'zebra'))}' has no images",
        ),
        "corrupt_image": (
            progress_off(*train("corrupt_image"), *TINY, f"data.root={p['corrupt']}"),
            rf"image file '{re.escape(str(p['corrupt'] / 'train' / 'cat' / 'broken.JPEG'))}' is corrupt or truncated",
        ),
        "corrupt_image_in_worker": (
            (*train("corrupt_image_in_worker"), *TINY, "data.workers=2", f"data.root={p['corrupt']}"),
            rf"image file '{re.escape(str(p['corrupt'] / 'train' / 'cat' / 'broken.JPEG'))}' is corrupt or truncated",
        ),
        "truncated_jpeg": (
            progress_off(*train("truncated_jpeg"), *TINY, f"data.root={p['truncated']}"),
            rf"image file '{re.escape(str(p['truncated'] / 'train' / 'dog' / 'cut.JPEG'))}' is corrupt or truncated",
        ),
        "resume_other_width": (
            (*train("resume_other_width"), "model.width=8", "--resume", str(p["run"])),
            r"checkpoint .*step_00000022 was trained with another config; these keys define the run .*model\.width: checkpoint 4, now 8",
        ),
        "pretrained_resnet50_into_resnet18": (
            (*train("pretrained_resnet50_into_resnet18"), "model.width=64", "model.small_input=false", f"model.pretrained={p['resnet50']}"),
            rf"model\.pretrained file '{re.escape(str(p['resnet50']))}' does not fit this model \(shape mismatch at layer1\.0\.conv1\.weight",
        ),
        "eval_corrupt_checkpoint": (("eval", str(p["random_ckpt"])), r"checkpoint '.*random\.pt' is corrupt or not a distq checkpoint"),
    }


@pytest.fixture(scope="module")
def outcomes(inputs, run_distq):
    """name -> CompletedProcess of every case, plus the --debug run and a good eval."""
    runs = {name: args for name, (args, _) in cases(inputs).items()}
    runs["debug"] = ("--debug", "train", CONFIG, "train.epcohs=3")
    runs["eval_ok"] = ("eval", str(inputs["run"]))
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(runs, pool.map(lambda args: run_distq(*args), runs.values())))
    return done


CASE_NAMES = list(cases(defaultdict(lambda: Path("/placeholder"))))
PROGRESS_BAR = re.compile(r"^\s*$|^epoch \d+/\d+: ")


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_gives_one_error_line(name, inputs, outcomes):
    proc = outcomes[name]
    _, pattern = cases(inputs)[name]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = proc.stderr.splitlines()
    errors = [line for line in lines if line.startswith("distq: error:")]
    assert len(errors) == 1, proc.stderr
    assert re.search(pattern, errors[0]), errors[0]
    if name == "corrupt_image_in_worker":  # the progress bar is on: its lines may come first
        assert lines[-1] == errors[0]
        assert all(PROGRESS_BAR.match(line) for line in lines[:-1]), proc.stderr
    else:
        assert lines == errors, proc.stderr


def test_exit_code_is_two(outcomes):
    assert {outcomes[name].returncode for name in CASE_NAMES} == {2}


def test_debug_shows_the_traceback(outcomes):
    proc = outcomes["debug"]
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ConfigError: unknown config key 'train.epcohs': did you mean 'train.epochs'?" in proc.stderr


def test_eval_of_a_good_checkpoint_reproduces_the_final_accuracy(outcomes, inputs):
    proc = outcomes["eval_ok"]
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    trained = json.loads((inputs["run"] / "results.json").read_text())
    assert results["val/top1"] == trained["val/top1"]
    assert results["val/top5"] == trained["val/top5"]


# --- the same error path in-process (no interpreter start-up per case) ------------------


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (["train"], r"distq train needs a CONFIG file"),
        (["train", "/nonexistent/nope.yaml"], r"config file '/nonexistent/nope\.yaml' not found"),
        (["train", CONFIG_PATH, "trian.epochs=3"], r"unknown config key 'trian\.epochs': did you mean 'train\.epochs'\?"),
        (["train", CONFIG_PATH, "quant.a_bits=0"], r"quant\.a_bits=0 is not a valid bit-width"),
        (["train", CONFIG_PATH, "train.epochs"], r"override 'train\.epochs' is not of the form key=value"),
        (["eval", "/nonexistent/last.pt"], r"checkpoint '/nonexistent/last\.pt' not found"),
        (["train", CONFIG_PATH, "model.arch=alexnet", "model.width=32"], r"model\.width is only supported for ResNets"),
        (["train", CONFIG_PATH, "model.arch=vgg16"], r"model\.arch='vgg16' is unknown: use one of alexnet, resnet18, resnet34, resnet50"),
        (["plan", CONFIG_PATH, "model.arch=vgg16"], r"model\.arch='vgg16' is unknown"),
    ],
)
def test_main_reports_errors_in_process(argv, pattern, capsys, digits_root, monkeypatch):
    from distq.cli import main

    monkeypatch.setenv("DISTQ_CACHE", str(digits_root.parent))
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("distq: error: "), captured.err
    assert re.search(pattern, lines[0]), lines[0]


def test_eval_on_a_dataset_with_other_classes(tiny_run, tmp_path, make_image_folder, capsys):
    from distq.cli import main

    other = make_image_folder(tmp_path / "other", per_class=1)
    assert main(["eval", str(tiny_run), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(
        r"distq: error: dataset '.*other' has 2 classes but checkpoint .* was trained on 10: 10 of them missing from the data "
        r"\(digit_0, digit_1, digit_2, \.\.\.\); 2 extra in the data \(cat, dog\): evaluate on a dataset with the same class folders\n",
        err,
    ), err


def test_pretrained_file_missing(digits_root, tmp_path, capsys, monkeypatch):
    from distq.cli import main

    monkeypatch.setenv("DISTQ_CACHE", str(digits_root.parent))
    argv = ["train", CONFIG_PATH, f"run.dir={tmp_path}", "model.width=4", "model.pretrained=/nonexistent/w.pth"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == "distq: error: model.pretrained file '/nonexistent/w.pth' not found: give the path of a saved state_dict or a distq run directory\n"
