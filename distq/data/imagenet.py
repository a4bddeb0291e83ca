"""``distq data prepare``: ImageNet-1k (ILSVRC2012) as ``ROOT/{train,val}/<wnid>/*.JPEG``.

From the official archives::

    distq data prepare --train ILSVRC2012_img_train.tar --val ILSVRC2012_img_val.tar \\
        --devkit ILSVRC2012_devkit_t12.tar.gz --out ROOT

or from the other common layout (already-extracted class folders for train, one flat folder
for val with ``LOC_val_solution.csv``, class names in ``LOC_synset_mapping.txt``; both files
are looked up next to the val folder and above it when not given)::

    distq data prepare --train ILSVRC/Data/CLS-LOC/train --val ILSVRC/Data/CLS-LOC/val --out ROOT

It also writes ``ROOT/class_names.json`` (wnid -> "tench, Tinca tinca"), which ``distq data pack``,
``distq export`` and ``distq predict`` use, and runs ``distq data verify`` at the end.

The devkit and the val archive are parsed by torchvision's ``datasets.imagenet`` helpers
(``parse_devkit_archive``: the leaf synsets of ``meta.mat`` and the validation ground truth;
``parse_val_archive``: val images into their class folders). Those helpers first compare the
archive's MD5 with the official one, silently (minutes for the 147 GB train archive); distq
does that comparison itself, against the same official sums (torchvision's ``ARCHIVE_META``),
with a progress bar, a clear message when it fails and a record of archives already checked,
and then runs the helpers with their own check turned off. ``--skip-md5`` skips the comparison
(test miniatures, or copies you checked yourself). The train archive (one tar of 1000 per-class
tars) is read class by class instead of with ``parse_train_archive``, which first extracts all
1000 inner tars (twice the disk space) and cannot resume.

Idempotent and resumable: each class is extracted into ``ROOT/.prepare/`` and renamed into
place when complete, and val likewise as a whole; a second run (or one after an interruption)
skips what is in place and redoes only what is not.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tarfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

from distq.data.folder import CLASS_NAMES, DataError
from distq.progress import Progress

WORK = ".prepare"
STATE = "state.json"
VAL_SOLUTION, SYNSET_MAPPING = "LOC_val_solution.csv", "LOC_synset_mapping.txt"
MD5_CHUNK = 1 << 22


# --- the official archives' checksums ----------------------------------------------------


def official_md5(kind: str) -> tuple[str, str]:
    """(official file name, MD5) of the "train", "val" or "devkit" archive, from torchvision."""
    from torchvision.datasets.imagenet import ARCHIVE_META

    return ARCHIVE_META[kind]


def file_md5(path: Path, progress: bool = True) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    size = path.stat().st_size
    with open(path, "rb") as f, Progress(max(1, size >> 20), f"md5 {path.name}", every=max(1, size >> 24), unit="MiB", enabled=progress) as bar:
        while chunk := f.read(MD5_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk) >> 20)
    return digest.hexdigest()


class _State:
    """``ROOT/.prepare/state.json``: archives whose MD5 matched (by path, size and mtime)."""

    def __init__(self, out: Path):
        self.path = out / WORK / STATE
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"md5_ok": {}}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.data, indent=1))
        os.replace(temporary, self.path)

    def check_md5(self, path: Path, kind: str, progress: bool) -> None:
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        if self.data["md5_ok"].get(str(path.resolve())) == stamp:
            return
        name, want = official_md5(kind)
        got = file_md5(path, progress)
        if got != want:
            raise DataError(
                f"{str(path)!r} has MD5 {got}, the official {name} has {want}: the file is damaged or not the official "
                "archive; download it again (--skip-md5 only for archives you have checked yourself)"
            )
        self.data["md5_ok"][str(path.resolve())] = stamp
        self.save()


@contextmanager
def _torchvision_md5_check_off():
    """torchvision's ImageNet helpers with their own MD5 comparison turned off (distq made it)."""
    from torchvision.datasets import imagenet

    with mock.patch.dict(imagenet.ARCHIVE_META, {kind: (name, None) for kind, (name, _) in imagenet.ARCHIVE_META.items()}):
        yield imagenet


# --- class names ----------------------------------------------------------------------------


def devkit_metadata(devkit: Path, work: Path) -> tuple[dict[str, str], list[str]]:
    """({wnid: class name}, wnid of every val image in file-name order), by torchvision's
    ``parse_devkit_archive`` (leaf synsets of meta.mat, the val ground truth)."""
    with _torchvision_md5_check_off() as imagenet:
        try:
            imagenet.parse_devkit_archive(str(work), file=str(devkit.resolve()))
            wnid_to_classes, val_wnids = imagenet.load_meta_file(str(work))
        except (OSError, KeyError, ValueError, IndexError, tarfile.TarError) as exc:
            raise DataError(f"devkit {str(devkit)!r} could not be read ({exc}): give ILSVRC2012_devkit_t12.tar.gz") from None
    return {wnid: ", ".join(names) for wnid, names in wnid_to_classes.items()}, list(val_wnids)


def synset_mapping(path: Path) -> dict[str, str]:
    """``LOC_synset_mapping.txt``: one ``wnid name, other name`` per line."""
    names = {}
    for line in path.read_text().splitlines():
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            names[wnid] = name.strip()
    return names


def val_solution(path: Path) -> dict[str, str]:
    """``LOC_val_solution.csv``: {image id: wnid} (the first box's class: every box of an image has it)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in rows}
    except (KeyError, IndexError) as exc:
        raise DataError(f"{str(path)!r} is not ImageNet's {VAL_SOLUTION} (columns ImageId,PredictionString): {exc}") from None


def find_near(folder: Path, name: str, levels: int = 4) -> Path | None:
    """``name`` in ``folder`` or one of its ``levels`` parents."""
    for candidate in [folder, *list(folder.resolve().parents)[:levels]]:
        if (candidate / name).is_file():
            return candidate / name
    return None


# --- extraction -------------------------------------------------------------------------------


def _rename_into_place(staging: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)


def extract_class(inner: tarfile.TarFile, staging: Path) -> None:
    """One class's images from its (streamed) inner tar into ``staging``."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    inner.extractall(staging, filter="data")


def prepare_train_archive(archive: Path, out: Path, progress: bool) -> int:
    """Extract the classes of the train archive (a tar of ``<wnid>.tar``) not yet in place; returns how many."""
    done = 0
    try:
        outer = tarfile.open(archive)
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"train archive {str(archive)!r} is not a tar file ({exc}): give ILSVRC2012_img_train.tar") from None
    with outer:
        members = [m for m in outer.getmembers() if m.isfile() and m.name.endswith(".tar")]
        if not members:
            raise DataError(f"train archive {str(archive)!r} holds no per-class tars (<wnid>.tar): give ILSVRC2012_img_train.tar")
        with Progress(len(members), "train classes", every=max(1, len(members) // 20), unit="class", enabled=progress) as bar:
            for member in members:
                wnid = Path(member.name).stem
                final = out / "train" / wnid
                if not final.is_dir():
                    staging = out / WORK / "train" / wnid
                    with tarfile.open(fileobj=outer.extractfile(member), mode="r|") as inner:
                        extract_class(inner, staging)
                    _rename_into_place(staging, final)
                    done += 1
                bar.update()
    return done


def prepare_train_folders(folder: Path, out: Path, progress: bool) -> int:
    """Copy the class folders of an extracted train folder not yet in place; returns how many."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"train folder {str(folder)!r} has no class folders (<wnid>/*.JPEG)")
    done = 0
    with Progress(len(classes), "train classes", every=max(1, len(classes) // 20), unit="class", enabled=progress) as bar:
        for source in classes:
            final = out / "train" / source.name
            if not final.is_dir():
                staging = out / WORK / "train" / source.name
                shutil.rmtree(staging, ignore_errors=True)
                shutil.copytree(source, staging)
                _rename_into_place(staging, final)
                done += 1
            bar.update()
    return done


def prepare_val_archive(archive: Path, val_wnids: list[str], out: Path) -> None:
    """The val archive into ``ROOT/val/<wnid>/`` by torchvision's ``parse_val_archive``."""
    staging = out / WORK / "val"
    shutil.rmtree(staging, ignore_errors=True)
    with _torchvision_md5_check_off() as imagenet:
        try:
            imagenet.parse_val_archive(str(out / WORK), file=str(archive.resolve()), wnids=val_wnids, folder="val")
        except (OSError, tarfile.TarError) as exc:
            raise DataError(f"val archive {str(archive)!r} could not be extracted ({exc}): give ILSVRC2012_img_val.tar") from None
    extracted = sum(1 for _ in staging.glob("*/*"))
    if extracted != len(val_wnids):
        raise DataError(f"val archive {str(archive)!r} holds {extracted} images, the devkit's ground truth lists {len(val_wnids)}: give the matching archive and devkit")
    _rename_into_place(staging, out / "val")


def prepare_val_folder(folder: Path, labels: dict[str, str] | None, out: Path, progress: bool) -> None:
    """A val folder into ``ROOT/val/<wnid>/``: copied as it is if it has class folders, else sorted
    by ``labels`` ({image id: wnid}, from ``LOC_val_solution.csv``)."""
    staging = out / WORK / "val"
    shutil.rmtree(staging, ignore_errors=True)
    if any(p.is_dir() for p in folder.iterdir()):
        shutil.copytree(folder, staging)
    else:
        images = sorted(p for p in folder.iterdir() if p.is_file())
        if labels is None:
            raise DataError(f"val folder {str(folder)!r} is flat: give --val-labels {VAL_SOLUTION} (no {VAL_SOLUTION} found next to it or above)")
        unlabeled = [p.name for p in images if p.stem not in labels]
        if unlabeled:
            raise DataError(f"val image {str(folder / unlabeled[0])!r} is not in {VAL_SOLUTION} ({len(unlabeled)} such images): give the matching file")
        with Progress(len(images), "val images", every=max(1, len(images) // 20), unit="image", enabled=progress) as bar:
            for image in images:
                target = staging / labels[image.stem] / image.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(image, target)
                bar.update()
    _rename_into_place(staging, out / "val")


# --- the command ---------------------------------------------------------------------------


def prepare(
    out: str | Path,
    train: str | Path,
    val: str | Path,
    devkit: str | Path | None = None,
    val_labels: str | Path | None = None,
    synsets: str | Path | None = None,
    check_md5: bool = True,
    progress: bool = True,
) -> list[str]:
    """Lay ImageNet out under ``out``; returns what was done, one line each (verification is the caller's)."""
    out, train, val = Path(out), Path(train), Path(val)
    for what, path in (("--train", train), ("--val", val), ("--devkit", devkit), ("--val-labels", val_labels), ("--synsets", synsets)):
        if path is not None and not Path(path).exists():
            raise DataError(f"{what} {str(path)!r} does not exist")
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    state = _State(out)
    archives = {"train": train if train.is_file() else None, "val": val if val.is_file() else None, "devkit": Path(devkit) if devkit else None}
    if archives["val"] is not None and devkit is None:
        raise DataError("the val archive needs the devkit for its labels: give --devkit ILSVRC2012_devkit_t12.tar.gz")
    if check_md5:
        for kind, path in archives.items():
            if path is not None:
                state.check_md5(path, kind, progress)

    val_wnids: list[str] = []
    if devkit is not None:
        names, val_wnids = devkit_metadata(Path(devkit), work)
    else:
        mapping = Path(synsets) if synsets else find_near(val, SYNSET_MAPPING)
        if mapping is None:
            raise DataError(f"class names: give --devkit ILSVRC2012_devkit_t12.tar.gz or --synsets {SYNSET_MAPPING}")
        names = synset_mapping(mapping)
    (out / CLASS_NAMES).write_text(json.dumps(names, indent=1, sort_keys=True) + "\n")

    done = []
    new_classes = prepare_train_archive(train, out, progress) if archives["train"] else prepare_train_folders(train, out, progress)
    done.append(f"train: {new_classes} class(es) extracted" + (" (the others were in place)" if new_classes < len(names) else ""))
    if (out / "val").is_dir():
        done.append("val: in place")
    else:
        if archives["val"] is not None:
            prepare_val_archive(val, val_wnids, out)
        else:
            solution = Path(val_labels) if val_labels else find_near(val, VAL_SOLUTION)
            prepare_val_folder(val, val_solution(solution) if solution else None, out, progress)
        done.append("val: extracted")
    unnamed = sorted(p.name for p in (out / "train").iterdir() if p.is_dir() and p.name not in names)
    if unnamed:
        done.append(f"warning: {len(unnamed)} class folder(s) have no name in {CLASS_NAMES}, e.g. {unnamed[0]}")
    shutil.rmtree(work / "train", ignore_errors=True)
    shutil.rmtree(work / "val", ignore_errors=True)
    return done
