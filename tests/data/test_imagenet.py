"""``distq data prepare`` and ``distq data verify`` on miniatures of ImageNet's official archives
and of the other common layout (extracted train folders, flat val folder + LOC_val_solution.csv).

The miniature has the official file naming: ``ILSVRC2012_img_train.tar`` holding one
``<wnid>.tar`` per class of ``<wnid>_<n>.JPEG``, ``ILSVRC2012_img_val.tar`` holding
``ILSVRC2012_val_<8 digits>.JPEG``, and ``ILSVRC2012_devkit_t12.tar.gz`` with ``data/meta.mat``
(synsets, one of them not a leaf, as in the real file) and the val ground truth (class IDs).
Its oddities are ImageNet's: a CMYK JPEG and a PNG named .JPEG in train, a grayscale JPEG in val.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distq.cli import main
from distq.data import imagenet
from distq.data.folder import CLASS_NAMES, DataError
from distq.data.verify import verify

# (ILSVRC2012_ID, wnid, words) of the leaf classes; ID 1001 is a non-leaf synset the devkit also lists.
SYNSETS = [(1, "n01440764", "tench, Tinca tinca"), (2, "n01443537", "goldfish, Carassius auratus"), (3, "n01484850", "great white shark, white shark")]
NON_LEAF = (1001, "n00001740", "entity")
TRAIN_PER_CLASS = 4
# The class ID of val images 1..7, in file-name order (the devkit's ground truth).
VAL_IDS = [3, 1, 2, 1, 3, 2, 2]
CMYK_FILE, PNG_FILE, GRAY_FILE = "train/n01443537/n01443537_3.JPEG", "train/n01484850/n01484850_1.JPEG", "val/n01440764/ILSVRC2012_val_00000004.JPEG"


def jpeg_bytes(seed: int, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(24, 30, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def train_image(wnid: str, n: int) -> bytes:
    name = f"train/{wnid}/{wnid}_{n}.JPEG"
    seed = int(wnid[1:]) * 10 + n
    if name == CMYK_FILE:
        return jpeg_bytes(seed, "CMYK")
    if name == PNG_FILE:
        return jpeg_bytes(seed, fmt="PNG")
    return jpeg_bytes(seed)


def val_image(number: int) -> bytes:
    wnid = SYNSETS[VAL_IDS[number - 1] - 1][1]
    gray = f"val/{wnid}/ILSVRC2012_val_{number:08d}.JPEG" == GRAY_FILE
    return jpeg_bytes(1000 + number, "L" if gray else "RGB")


def write_meta_mat(path: Path) -> None:
    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images"]
    rows = [(i, w, words, f"gloss of {w}", 0, np.zeros(0), 0, TRAIN_PER_CLASS) for i, w, words in SYNSETS]
    rows.append((*NON_LEAF, "the root", len(SYNSETS), np.arange(1, len(SYNSETS) + 1), 3, 0))
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        synsets[i, 0] = row
    savemat(path, {"synsets": synsets})


def write_archives(folder: Path) -> dict[str, Path]:
    """The three official archives, in miniature."""
    folder.mkdir(parents=True, exist_ok=True)
    train = folder / "ILSVRC2012_img_train.tar"
    with tarfile.open(train, "w") as outer:
        for _, wnid, _ in SYNSETS:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for n in range(1, TRAIN_PER_CLASS + 1):
                    add_file(tar, f"{wnid}_{n}.JPEG", train_image(wnid, n))
            add_file(outer, f"{wnid}.tar", inner.getvalue())
    val = folder / "ILSVRC2012_img_val.tar"
    with tarfile.open(val, "w") as tar:
        for number in range(1, len(VAL_IDS) + 1):
            add_file(tar, f"ILSVRC2012_val_{number:08d}.JPEG", val_image(number))
    data = folder / "devkit" / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    write_meta_mat(data / "meta.mat")
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in VAL_IDS))
    devkit = folder / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(devkit, "w:gz") as tar:
        tar.add(folder / "devkit" / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")
    return {"train": train, "val": val, "devkit": devkit}


def write_extracted_layout(folder: Path) -> dict[str, Path]:
    """Kaggle's layout: ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/ flat}, LOC_val_solution.csv, LOC_synset_mapping.txt."""
    base = folder / "ILSVRC" / "Data" / "CLS-LOC"
    for _, wnid, _ in SYNSETS:
        (base / "train" / wnid).mkdir(parents=True)
        for n in range(1, TRAIN_PER_CLASS + 1):
            (base / "train" / wnid / f"{wnid}_{n}.JPEG").write_bytes(train_image(wnid, n))
    (base / "val").mkdir(parents=True)
    rows = ["ImageId,PredictionString"]
    for number in range(1, len(VAL_IDS) + 1):
        image_id = f"ILSVRC2012_val_{number:08d}"
        (base / "val" / f"{image_id}.JPEG").write_bytes(val_image(number))
        wnid = SYNSETS[VAL_IDS[number - 1] - 1][1]
        rows.append(f"{image_id},{wnid} 1 2 20 18 {wnid} 3 4 10 12")
    (folder / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (folder / "LOC_synset_mapping.txt").write_text("".join(f"{w} {words}\n" for _, w, words in SYNSETS))
    return {"train": base / "train", "val": base / "val"}


def expected_layout() -> dict[str, dict[str, list[str]]]:
    """The files prepare must write, computed from the miniature's definition alone."""
    train = {w: sorted(f"{w}_{n}.JPEG" for n in range(1, TRAIN_PER_CLASS + 1)) for _, w, _ in SYNSETS}
    val: dict[str, list[str]] = {}
    for number, class_id in enumerate(VAL_IDS, 1):
        val.setdefault(SYNSETS[class_id - 1][1], []).append(f"ILSVRC2012_val_{number:08d}.JPEG")
    return {"train": train, "val": val}


def layout_of(root: Path) -> dict[str, dict[str, list[str]]]:
    return {split: {c.name: sorted(f.name for f in c.iterdir()) for c in sorted((root / split).iterdir())} for split in ("train", "val")}


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    return write_archives(tmp_path_factory.mktemp("archives"))


def prepare_args(archives: dict[str, Path], out: Path) -> list[str]:
    return ["data", "prepare", "--train", archives["train"], "--val", archives["val"], "--devkit", archives["devkit"], "--out", out, "--skip-md5"]


def distq(capsys, *args) -> tuple[int, str, str]:
    """``distq ARGS`` in this process (the command line, without a torch import per case): (status, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --- prepare ----------------------------------------------------------------------------------


def test_prepare_lays_out_the_official_archives(archives, tmp_path, run_distq, capsys):
    out = tmp_path / "imagenet"
    done = run_distq(*prepare_args(archives, out))
    assert done.returncode == 0, done.stderr
    assert layout_of(out) == expected_layout()
    # Files arrive byte for byte, the val images in the class the ground truth gives them.
    assert (out / "train" / "n01440764" / "n01440764_2.JPEG").read_bytes() == train_image("n01440764", 2)
    assert (out / "val" / "n01484850" / "ILSVRC2012_val_00000005.JPEG").read_bytes() == val_image(5)
    # The leaf synsets only, with their names, as predict and export use them.
    assert json.loads((out / CLASS_NAMES).read_text()) == {w: words for _, w, words in SYNSETS}
    # The verification report is part of the output: counts and each oddity.
    out_text = done.stdout
    assert "train: 12 images in 3 classes" in out_text and "val: 7 images in 3 classes" in out_text
    assert f"CMYK JPEG: 1 file(s)\n  {out / CMYK_FILE}" in out_text
    assert f"PNG saved as JPEG: 1 file(s)\n  {out / PNG_FILE}" in out_text
    assert f"grayscale JPEG: 1 file(s)\n  {out / GRAY_FILE}" in out_text
    assert not (out / imagenet.WORK / "train").exists() and not (out / imagenet.WORK / "val").exists()

    code, again, err = distq(capsys, *prepare_args(archives, out))  # idempotent: nothing to redo
    assert code == 0, err
    assert "train: 0 class(es) extracted (the others were in place)" in again and "val: in place" in again
    assert layout_of(out) == expected_layout()


def test_an_interrupted_prepare_resumes_without_redoing_finished_classes(archives, tmp_path, monkeypatch):
    out = tmp_path / "imagenet"
    extracted: list[str] = []
    real_extract = imagenet.extract_class

    def extract_then_fail_on_the_second(inner, staging):
        extracted.append(staging.name)
        real_extract(inner, staging)
        if len(extracted) == 2:  # the second class is half done: extracted, not in place
            raise KeyboardInterrupt

    monkeypatch.setattr(imagenet, "extract_class", extract_then_fail_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        imagenet.prepare(out, archives["train"], archives["val"], archives["devkit"], check_md5=False, progress=False)
    first = out / "train" / "n01440764"
    assert [p.name for p in (out / "train").iterdir()] == ["n01440764"] and not (out / "val").exists()
    stamp = first.stat().st_ino, (first / "n01440764_1.JPEG").stat().st_mtime_ns

    extracted.clear()
    monkeypatch.setattr(imagenet, "extract_class", lambda inner, staging: (extracted.append(staging.name), real_extract(inner, staging)))
    imagenet.prepare(out, archives["train"], archives["val"], archives["devkit"], check_md5=False, progress=False)
    assert extracted == ["n01443537", "n01484850"]  # the finished class was not redone
    assert (first.stat().st_ino, (first / "n01440764_1.JPEG").stat().st_mtime_ns) == stamp
    assert layout_of(out) == expected_layout()


def test_prepare_accepts_the_extracted_layout(tmp_path, capsys):
    source = write_extracted_layout(tmp_path / "kaggle")
    out = tmp_path / "imagenet"
    code, _, err = distq(capsys, "data", "prepare", "--train", source["train"], "--val", source["val"], "--out", out, "--workers", "1")
    assert code == 0, err
    assert layout_of(out) == expected_layout()
    assert json.loads((out / CLASS_NAMES).read_text()) == {w: words for _, w, words in SYNSETS}


def test_md5_of_the_official_archives_is_checked(archives, tmp_path, capsys):
    out = tmp_path / "imagenet"
    code, _, err = distq(capsys, *prepare_args(archives, out)[:-1])  # without --skip-md5
    assert code == 2
    (line,) = err.strip().splitlines()
    name, md5 = imagenet.official_md5("train")
    assert line.startswith(f"distq: error: '{archives['train']}' has MD5 ") and f"the official {name} has {md5}" in line
    assert "damaged or not the official archive" in line


def test_matching_md5_is_recorded_and_not_recomputed(archives, tmp_path, monkeypatch):
    """With the official sums replaced by the miniature's, prepare checks and remembers them."""
    sums = {kind: (imagenet.official_md5(kind)[0], imagenet.file_md5(path, progress=False)) for kind, path in archives.items()}
    monkeypatch.setattr(imagenet, "official_md5", sums.__getitem__)
    computed = []
    real_md5 = imagenet.file_md5
    monkeypatch.setattr(imagenet, "file_md5", lambda path, progress=True: (computed.append(path.name), real_md5(path, progress))[1])
    out = tmp_path / "imagenet"
    imagenet.prepare(out, archives["train"], archives["val"], archives["devkit"], progress=False)
    assert sorted(computed) == sorted(p.name for p in archives.values())
    computed.clear()
    imagenet.prepare(out, archives["train"], archives["val"], archives["devkit"], progress=False)
    assert computed == []


def test_a_val_archive_without_devkit_is_one_line(archives, tmp_path, capsys):
    code, _, err = distq(capsys, "data", "prepare", "--train", archives["train"], "--val", archives["val"], "--out", tmp_path / "out", "--skip-md5")
    assert code == 2
    assert err.strip().splitlines() == ["distq: error: the val archive needs the devkit for its labels: give --devkit ILSVRC2012_devkit_t12.tar.gz"]


# --- verify -----------------------------------------------------------------------------------


@pytest.fixture
def prepared(archives, tmp_path) -> Path:
    out = tmp_path / "imagenet"
    imagenet.prepare(out, archives["train"], archives["val"], archives["devkit"], check_md5=False, progress=False)
    return out


def test_verify_reports_counts_oddities_undecodable_files_and_one_split_classes(prepared, capsys):
    truncated = prepared / "train" / "n01440764" / "n01440764_3.JPEG"
    truncated.write_bytes(truncated.read_bytes()[:200])
    (prepared / "train" / "n09999999").mkdir()
    (prepared / "train" / "n09999999" / "n09999999_1.JPEG").write_bytes(jpeg_bytes(7))
    code, out, err = distq(capsys, "data", "verify", prepared, "--workers", "2")
    assert code == 1, err
    lines = out.splitlines()
    assert "train: 13 images in 4 classes, 1..4 per class" in lines
    assert "val: 7 images in 3 classes, 2..3 per class" in lines
    assert "  n01443537: 3" in lines  # val's count of that class
    assert "class n09999999 is in train/ only" in lines
    assert any(line.startswith(f"does not decode: {truncated} (") for line in lines)
    for kind, path in (("CMYK JPEG", CMYK_FILE), ("PNG saved as JPEG", PNG_FILE), ("grayscale JPEG", GRAY_FILE)):
        assert lines[lines.index(f"{kind}: 1 file(s)") + 1] == f"  {prepared / path}"
    assert lines[-1] == f"run 'distq data verify {prepared} --fix' to re-encode the odd files as RGB JPEGs"


def test_verify_fix_makes_the_odd_files_plain_rgb_jpegs(prepared):
    report = verify(prepared, fix=True, workers=2, progress=False)
    assert sorted(report.fixed) == sorted(str(prepared / p) for p in (CMYK_FILE, PNG_FILE, GRAY_FILE))
    assert report.clean
    for path in (CMYK_FILE, PNG_FILE, GRAY_FILE):
        with Image.open(prepared / path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (30, 24))
    again = verify(prepared, workers=1, progress=False)
    assert again.clean and not again.oddities
    assert again.lines()[-1] == "no problems found"
    assert not list(prepared.rglob(".*.fix"))  # no temporary files left


def test_verify_a_missing_folder_is_one_line(tmp_path, capsys):
    code, _, err = distq(capsys, "data", "verify", tmp_path / "absent")
    assert code == 2
    assert err.strip().splitlines() == [f"distq: error: dataset folder '{tmp_path / 'absent'}' does not exist"]


def test_prepare_names_a_missing_input(tmp_path):
    with pytest.raises(DataError, match="--train '.*nothing' does not exist"):
        imagenet.prepare(tmp_path / "out", tmp_path / "nothing", tmp_path / "nothing")
