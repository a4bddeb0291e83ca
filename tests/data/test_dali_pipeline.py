"""The DALI loaders (CPU pipelines) against the torchvision path on the same folders.

Tolerance, measured on these folders and on 24 random-size photos-like JPEGs at 97/160/224 px
(both paths crop the same pixels, see ``_torchvision_val_geometry``): DALI's and torchvision's
validation tensors differ by at most one grey level (1/255/std ~ 0.0175 in normalized units)
in any pixel, by ~0.003 on average per image (worst 0.0044), and their per-channel means by
at most 0.0022. The asserts below leave about a 2x margin on the averages.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from distq.config.schema import DataConfig  # noqa: E402
from distq.data import BatchLayout, DataError  # noqa: E402
from distq.data.dali import build_dali_loaders as dali_loaders  # noqa: E402
from distq.data.torchvision_loader import build_torchvision_loaders as torchvision_loaders  # noqa: E402
from distq.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

ONE_GREY_LEVEL = 1 / 255 / min(IMAGENET_STD)
# Class folders in an order that sorting changes, each class with its own base colour.
CLASS_COLOURS = {"zebra": (220, 40, 40), "ant": (40, 200, 60), "moth": (50, 60, 210)}
SIZES = [(40, 30), (64, 48), (48, 64), (50, 50), (30, 40), (57, 43)]


def _write_coloured_folder(root: Path, train_per_class: int = 7, val_per_class: int = 3) -> Path:
    """``root/{train,val}/<class>/*.JPEG``: smooth noise around the class colour, sizes 30..64 px."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for cls, colour in CLASS_COLOURS.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                width, height = SIZES[(n + len(cls)) % len(SIZES)]
                noise = rng.normal(0, 6, (height, width, 3)).cumsum(axis=1)
                pixels = np.clip(np.array(colour) + noise - noise.mean(), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{cls}_{n}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def coloured_root(tmp_path_factory) -> Path:
    return _write_coloured_folder(tmp_path_factory.mktemp("coloured"))


@pytest.fixture(scope="module", params=["coloured", "digits"])
def root(request, coloured_root) -> Path:
    return coloured_root if request.param == "coloured" else request.getfixturevalue("digits_root")


def build_dali_loaders(cfg: DataConfig, seed: int, rank: int = 0, world: int = 1):
    return dali_loaders(cfg, seed, BatchLayout(cfg.batch_size, 1, world), rank)


def build_torchvision_loaders(cfg: DataConfig, seed: int, rank: int = 0, world: int = 1):
    return torchvision_loaders(cfg, seed, BatchLayout(cfg.batch_size, 1, world), rank)


def _cfg(root: Path, **overrides) -> DataConfig:
    values = dict(root=str(root), loader="dali", image_size=32, batch_size=4, workers=1, crop_scale=[0.5, 1.0])
    return DataConfig(**(values | overrides))


def _val(bundle) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(bundle.val)
    assert len(batches) == len(bundle.val)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def _signatures(images: torch.Tensor, labels: torch.Tensor) -> list[tuple]:
    """One value per image that tells the images of these folders apart."""
    return [(int(y), round(float(x.double().sum()), 2)) for x, y in zip(images, labels)]


# --- (a) labels ----------------------------------------------------------------------------------


def test_val_labels_and_order_match_torchvision(root):
    cfg = _cfg(root)
    dali, torchvision = build_dali_loaders(cfg, seed=0), build_torchvision_loaders(cfg, seed=0)
    assert dali.classes == torchvision.classes == sorted(p.name for p in (root / "train").iterdir())
    dali_images, dali_labels = _val(dali)
    tv_images, tv_labels = _val(torchvision)
    assert dali_labels.dtype == torch.int64 and dali_labels.shape == (len(dali_images),)
    assert torch.equal(dali_labels, tv_labels)  # same files, same order, same class indices
    assert (dali_images - tv_images).abs().amax(dim=(1, 2, 3)).max() <= ONE_GREY_LEVEL + 1e-4


def test_label_i_is_class_folder_i(coloured_root):
    bundle = build_dali_loaders(_cfg(coloured_root), seed=0)
    images, labels = _val(bundle)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    pixel_means = (images.mean(dim=(2, 3)) * std + mean) * 255
    for colour, label in zip(pixel_means, labels):
        expected = torch.tensor(CLASS_COLOURS[bundle.classes[label]], dtype=torch.float32)
        assert (colour - expected).abs().max() < 20


# --- (b) normalisation ---------------------------------------------------------------------------


def test_val_tensors_match_torchvision_within_a_grey_level(root):
    cfg = _cfg(root)
    dali_images, _ = _val(build_dali_loaders(cfg, seed=0))
    tv_images, _ = _val(build_torchvision_loaders(cfg, seed=0))
    diff = (dali_images - tv_images).abs()
    assert diff.flatten(1).mean(dim=1).max() < 0.01
    assert diff.max() <= ONE_GREY_LEVEL + 1e-4
    assert (dali_images.mean(dim=(2, 3)) - tv_images.mean(dim=(2, 3))).abs().max() < 0.005


def test_constant_colour_is_normalized_exactly(tmp_path):
    colour = (200, 100, 50)
    for split in ("train", "val"):
        for name in ("flat", "also_flat"):  # a dataset needs two classes
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (45, 35), colour).save(tmp_path / split / name / "flat.png")  # lossless
    images, _ = _val(build_dali_loaders(_cfg(tmp_path, batch_size=1), seed=0))
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)]
    assert images.shape == (2, 3, 32, 32)
    for image in images:
        torch.testing.assert_close(image, torch.tensor(expected).view(3, 1, 1).expand(3, 32, 32), rtol=0, atol=1e-5)


# --- (c) sharding --------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [4, 5])
def test_two_ranks_count_every_val_image_once(root, batch_size):
    cfg = _cfg(root, batch_size=batch_size)
    whole = _signatures(*_val(build_dali_loaders(cfg, seed=0)))
    assert len(set(whole)) == len(whole), "signatures must tell the images apart"
    shards = [_signatures(*_val(build_dali_loaders(cfg, seed=0, rank=rank, world=2))) for rank in (0, 1)]
    n_files = sum(1 for f in (root / "val").rglob("*") if f.is_file())
    assert len(shards[0]) + len(shards[1]) == len(whole) == n_files
    assert Counter(shards[0] + shards[1]) == Counter(whole)


# --- (d) training --------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch_size", "world"), [(4, 1), (5, 2), (3, 3)])
def test_train_steps_shapes_and_order_match_torchvision(coloured_root, batch_size, world):
    cfg = _cfg(coloured_root, batch_size=batch_size)
    for rank in range(world):
        dali = build_dali_loaders(cfg, seed=7, rank=rank, world=world)
        torchvision = build_torchvision_loaders(cfg, seed=7, rank=rank, world=world)
        assert len(dali.train) == len(torchvision.train) == 21 // (world * batch_size)
        dali.start_epoch(1)
        torchvision.start_epoch(1)
        batches = list(dali.train)
        assert len(batches) == len(dali.train)
        for (images, labels, indices), (_, tv_labels, tv_indices) in zip(batches, torchvision.train):
            assert images.shape == (batch_size, 3, 32, 32) and images.dtype == torch.float32
            assert labels.shape == indices.shape == (batch_size,) and labels.dtype == indices.dtype == torch.int64
            assert torch.equal(labels, tv_labels) and torch.equal(indices, tv_indices)  # the torchvision path's order


def test_train_epoch_is_a_function_of_seed_and_epoch(digits_root):
    cfg = _cfg(digits_root, batch_size=64, image_size=24)

    def epoch(bundle, number, start_step=0):
        bundle.start_epoch(number, start_step)
        return [(x.clone(), y.clone()) for x, y, _ in bundle.train][:6]

    first = build_dali_loaders(cfg, seed=3)
    resumed = build_dali_loaders(cfg, seed=3)  # a new process resuming at epoch 2
    reference = epoch(first, 2)
    for (x, y), (x2, y2) in zip(reference, epoch(resumed, 2)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(reference[0][1], epoch(first, 3)[0][1])
    # Mid-epoch: a process resuming after step 2 gets batches 2, 3, ... crop for crop.
    mid = epoch(build_dali_loaders(cfg, seed=3), 2, start_step=2)
    for (x, y), (x2, y2) in zip(reference[2:], mid):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_each_samples_crop_does_not_depend_on_its_batch(digits_root):
    """The crop and flip of a sample are drawn from (seed, epoch, index): the same image in
    two layouts (another batch, another position) comes out identical."""
    cfg = _cfg(digits_root, batch_size=16, image_size=24)
    small = dali_loaders(cfg, 3, BatchLayout(16, 1, 1), 0)
    split = dali_loaders(cfg, 3, BatchLayout(8, 1, 2), 1)
    small.start_epoch(1)
    split.start_epoch(1)
    crops = {int(i): x for images, _, indices in small.train for x, i in zip(images, indices)}
    seen = 0
    for images, _, indices in split.train:
        for x, i in zip(images, indices):
            assert torch.equal(x, crops[int(i)])
            seen += 1
    assert seen == len(crops) // 2


def test_missing_split_reports_the_torchvision_paths_error(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a" / "x.JPEG")
    cfg = _cfg(tmp_path, batch_size=1)
    with pytest.raises(DataError) as torchvision_error:
        build_torchvision_loaders(cfg, seed=0)
    with pytest.raises(DataError) as dali_error:
        build_dali_loaders(cfg, seed=0)
    assert str(dali_error.value) == str(torchvision_error.value)


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_undecodable_image_is_named_in_one_line(tmp_path, split):
    """DALI's own error names the decoder operator, not the file: the loader finds the file."""
    root = _write_coloured_folder(tmp_path / "data", train_per_class=7, val_per_class=5)
    bad = root / split / "moth" / "moth_2.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 8)
    bundle = build_dali_loaders(_cfg(root, batch_size=2), seed=0)
    bundle.start_epoch(0)
    with pytest.raises(DataError) as error:
        for _ in bundle.train if split == "train" else bundle.val:
            pass
    message = str(error.value)
    assert message.startswith(f"image file '{bad}' is corrupt or truncated") and "\n" not in message
    assert message.endswith("replace or delete it")
