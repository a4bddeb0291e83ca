"""Everyday data mistakes (issue 23): each ends as one ``distq: error:`` line (exit status 2), or
as a report line of ``distq data verify`` (exit status 1), that names the file and what to do.

A few cases run ``python -m distq`` as a user does; the rest call ``distq.cli.main`` (or the
loaders) in-process, which skips a torch import per case.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import struct
import tarfile
import zlib
from pathlib import Path

import pytest

from distq.cli import main
from distq.config.schema import DataConfig
from distq.data import DataError
from distq.data.bundle import dataset_classes
from distq.data.loaders import build_loaders
from distq.data.pack import pack
from distq.data.shards import INDEX
from distq.data.torchvision_loader import build_val_loader

NOT_AN_IMAGE = b"hello, I am a text file named like a JPEG\n"


@pytest.fixture
def folder(tmp_path, make_image_folder) -> Path:
    """cat/ and dog/, 4 images of 32x32 (1024 pixels) each in train/ and val/: 16 images."""
    return make_image_folder(tmp_path / "data", per_class=4, size=(32, 32))


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("distq: error: "), err
    return lines[0]


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def png_header(width: int, height: int) -> bytes:
    """A PNG file that announces ``width`` x ``height`` grey pixels (its data is cut short):
    opening it reads the size; only decoding would find the rest missing."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def deny_reading(monkeypatch, module, path: Path) -> None:
    """Make ``path`` unreadable for ``module``: chmod 000, and (root reads it anyway) an injected
    PermissionError from the ``open`` that module calls."""
    path.chmod(0)
    if os.geteuid() == 0:
        target = str(path)

        def denied(file, *args, **kwargs):
            if str(file) == target:
                raise PermissionError(13, "Permission denied", target)
            return builtins.open(file, *args, **kwargs)

        monkeypatch.setattr(module, "open", denied, raising=False)


class StubRunner:
    """What ``distq predict`` needs of an export file's runner: 32x32 inputs, two classes."""

    header = {"preprocess": {"image_size": 32, "val_crop_ratio": 1.0, "mean": [0.5] * 3, "std": [0.25] * 3}}
    classes = ["cat", "dog"]
    class_names: dict[str, str] = {}

    def __call__(self, images):
        import torch

        return torch.zeros(len(images), 2)


@pytest.fixture
def stub_predict(monkeypatch):
    """``distq predict`` with any FILE running ``StubRunner``."""
    import distq.infer.evaluate

    monkeypatch.setattr(distq.infer.evaluate, "load_runner", lambda path, engine="int": StubRunner())


# --- 1. pack decodes every image -----------------------------------------------------------------


def test_pack_refuses_an_undecodable_image_and_writes_nothing(folder, run_distq, tmp_path):
    bad = folder / "train" / "cat" / "x.JPEG"
    bad.write_bytes(NOT_AN_IMAGE)
    out = tmp_path / "shards"
    proc = run_distq("data", "pack", folder, "--out", out)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert line == (
        f"distq: error: 1 of the 17 images of {folder} cannot be packed: '{bad}' does not decode (not an image format PIL reads): "
        f"replace or delete the files that do not decode ('distq data verify {folder}' lists them all); nothing was written to {out}"
    )
    assert not out.exists()  # no partial shards folder
    assert "pack train: 9/9 images (100%)" in proc.stdout  # progress as usual


def test_pack_no_decode_packs_and_says_it_did_not_decode(folder, tmp_path, capsys):
    (folder / "train" / "cat" / "x.JPEG").write_bytes(NOT_AN_IMAGE)
    out = tmp_path / "shards"
    assert main(["data", "pack", str(folder), "--out", str(out), "--no-decode"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"did not decode the images (--no-decode): a file that does not decode is packed as it is; check with 'distq data verify {out} --decode'" in lines
    assert json.loads((out / INDEX).read_text())["splits"]["train"]["samples"] == 9


# --- 2. verify --decode decodes every sample of the shards ----------------------------------------


def test_verify_decode_names_the_shard_and_key_of_an_undecodable_sample(folder, tmp_path, capsys):
    (folder / "train" / "dog" / "x.JPEG").write_bytes(NOT_AN_IMAGE)
    out = tmp_path / "shards"
    pack(folder, out, decode=False, progress=False)
    tar = out / "train-000000.tar"
    with tarfile.open(tar) as archive:
        keys = [m.name.split(".")[0] for m in archive if m.name.endswith(".jpg")]
        bad_key = next(m.name.split(".")[0] for m in archive if m.name.endswith(".jpg") and archive.extractfile(m).read() == NOT_AN_IMAGE)
    assert main(["data", "verify", str(out)]) == 0  # the checksums alone cannot see it
    assert capsys.readouterr().out.splitlines()[-1] == "2 shards, checksums match index.json"
    assert main(["data", "verify", str(out), "--decode"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"does not decode: sample {bad_key} (number {keys.index(bad_key)}) of shard file '{tar}' (not an image format PIL reads)" in lines
    assert lines[-1] == "decoded 17 images: 1 cannot be used"


# --- 3. pack --out that is a file or someone else's folder ------------------------------------------


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_pack_out_that_is_a_file_or_a_non_empty_folder_is_left_untouched(folder, tmp_path, capsys, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_bytes(b"my notes, not shards\n")
        expected = f"distq: error: --out '{out}' is a file, expected a folder: choose an empty or new folder for --out"
    else:
        out.mkdir()
        (out / "notes.txt").write_bytes(b"my notes, not shards\n")
        expected = f"distq: error: '{out}' is not empty: choose an empty or new folder for --out"
    before = out.read_bytes() if kind == "file" else files_of(out)
    assert main(["data", "pack", str(folder), "--out", str(out)]) == 2
    assert one_error_line(capsys.readouterr().err) == expected
    assert (out.read_bytes() if kind == "file" else files_of(out)) == before


# --- 4. images over data.max_image_pixels ----------------------------------------------------------


def test_an_image_over_max_image_pixels_stops_training_naming_file_and_key(folder, run_distq, tiny_args, tmp_path):
    proc = run_distq(*tiny_args(tmp_path / "run", f"data.root={folder}", "data.batch_size=4", "data.max_image_pixels=1000"))
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    pattern = (
        rf"distq: error: image file '{re.escape(str(folder))}/train/(cat|dog)/00\d\.JPEG' has 1024 pixels \(32x32\), "
        r"more than data\.max_image_pixels=1000: shrink it, or raise data\.max_image_pixels if it is meant to be this large"
    )
    assert re.fullmatch(pattern, line), line


def test_an_image_over_max_image_pixels_in_shards_is_named_in_training_and_evaluation(folder, tmp_path):
    out = tmp_path / "shards"
    pack(folder, out, progress=False)
    cfg = DataConfig(root=str(out), format="shards", image_size=32, batch_size=4, workers=0, max_image_pixels=1000)
    bundle = build_loaders(cfg, seed=0)
    bundle.start_epoch(0)
    pattern = r"sample \d{6} \(number \d\) of shard file '.*/(train|val)-000000\.tar' has 1024 pixels \(32x32\), more than data\.max_image_pixels=1000: shrink the image and re-run distq data pack"
    for loader in (bundle.train, build_val_loader(cfg, out)):
        with pytest.raises(DataError, match=pattern):
            next(iter(loader))


def test_predict_names_max_image_pixels_for_an_image_over_the_limit(folder, tmp_path, capsys, stub_predict):
    small = folder / "val" / "cat" / "000.JPEG"
    assert main(["predict", "model.safetensors", str(small)]) == 0  # the stub runs a normal image
    capsys.readouterr()
    assert main(["predict", "--max-image-pixels", "1000", "model.safetensors", str(small)]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"distq: error: image file '{small}' has 1024 pixels (32x32), more than --max-image-pixels=1000: "
        "shrink it, or raise --max-image-pixels if it is meant to be this large"
    )
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header(15000, 15000))  # Pillow's own check: a DecompressionBombError traceback
    assert main(["predict", "model.safetensors", str(huge)]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"distq: error: image file '{huge}' has 225000000 pixels (15000x15000), more than --max-image-pixels=178956970: "
        "shrink it, or raise --max-image-pixels if it is meant to be this large"
    )


# --- 5. permission denied is not "corrupt" --------------------------------------------------------


def test_an_unreadable_image_is_permission_denied_in_verify(folder, monkeypatch, capsys):
    import distq.data.verify

    image = folder / "train" / "dog" / "001.JPEG"
    deny_reading(monkeypatch, distq.data.verify, image)
    assert main(["data", "verify", str(folder), "--workers", "1"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"permission denied: {image} (cannot be opened for reading)" in lines
    assert "1 file(s) cannot be read (permission denied): make these files readable (chmod a+r): the images themselves may be fine" in lines
    assert not any("does not decode" in line for line in lines)


def test_an_unreadable_image_is_permission_denied_in_training(folder, monkeypatch):
    import distq.data.folder

    image = folder / "train" / "cat" / "002.JPEG"
    deny_reading(monkeypatch, distq.data.folder, image)
    bundle = build_loaders(DataConfig(root=str(folder), image_size=32, batch_size=8, workers=0), seed=0)
    bundle.start_epoch(0)
    with pytest.raises(DataError) as error:
        next(iter(bundle.train))
    assert str(error.value) == f"image file '{image}' cannot be read: permission denied: make it readable by the user running distq (chmod a+r)"


# --- 6. one class ---------------------------------------------------------------------------------


def test_a_one_class_dataset_is_refused_for_training(tmp_path, make_image_folder, run_distq, tiny_args):
    root = make_image_folder(tmp_path / "cats", classes=("cat",), per_class=4, size=(32, 32))
    proc = run_distq(*tiny_args(tmp_path / "run", f"data.root={root}", "data.batch_size=4"))
    assert proc.returncode == 2
    assert one_error_line(proc.stderr) == (
        f"distq: error: dataset folder '{root / 'train'}' has 1 class (cat): a classifier needs at least two "
        f"(with one, every prediction is right and the loss is 0): add a folder of images per class to {root / 'train'}"
    )


@pytest.mark.parametrize("data_format", ["folders", "shards"])
def test_a_one_class_dataset_is_refused_for_evaluation(folder, tmp_path, data_format):
    """``distq eval`` and training take the class list from ``dataset_classes``."""
    root = folder
    if data_format == "folders":
        for split in ("train", "val"):
            for image in (folder / split / "dog").iterdir():
                image.unlink()
            (folder / split / "dog").rmdir()
    else:
        root = tmp_path / "shards"
        pack(folder, root, progress=False)
        index = json.loads((root / INDEX).read_text())
        index["classes"] = ["cat"]  # as a pack of a one-class folder would say
        (root / INDEX).write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"has 1 class \(cat\): a classifier needs at least two"):
        dataset_classes(DataConfig(root=str(root), format=data_format), root)


# --- 7. a file where a folder is expected, and the reverse -------------------------------------------


@pytest.mark.parametrize("data_format", ["folders", "shards"])
def test_data_root_that_is_a_file_says_so(folder, tmp_path, capsys, tiny_args, data_format):
    if data_format == "folders":
        root = folder / "train" / "cat" / "000.JPEG"
        expected = f"distq: error: dataset folder '{root}' is a file, expected a folder: set data.root to an ImageNet-layout folder (ROOT/train/<class>/*.JPEG)"
    else:
        shards = tmp_path / "shards"
        pack(folder, shards, progress=False)
        root = shards / INDEX
        expected = f"distq: error: shards folder '{root}' is a file, expected a folder: set data.root to the folder holding it, {shards}"
    argv = tiny_args(tmp_path / "run", f"data.root={root}", f"data.format={data_format}", "data.batch_size=4")
    assert main([str(a) for a in argv]) == 2
    assert one_error_line(capsys.readouterr().err) == expected


def test_predict_on_a_directory_says_it_is_a_directory(folder, capsys, stub_predict):
    images = folder / "val" / "cat"
    assert main(["predict", "model.safetensors", str(images)]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"distq: error: image file '{images}' is a directory, expected an image file: give the images in it (e.g. {images}/*.jpg)"
    )
