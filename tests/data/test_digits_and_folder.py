"""The embedded digits dataset, ImageNet-layout folders and the torchvision loaders."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distq.config.schema import DataConfig
from distq.data import DataError, build_val_loader, class_names, ensure_digits, image_folder
from distq.data.digits import VERSION
from distq.data.folder import load_rgb
from distq.data.loaders import build_loaders
from distq.data.torchvision_loader import ShardSampler
from distq.data.transforms import val_resize_size

# sklearn's digits: 1797 images; every fifth image of each class is validation.
TRAIN_IMAGES, VAL_IMAGES = 1442, 355
DIGIT_CLASSES = [f"digit_{i}" for i in range(10)]


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- digits ---------------------------------------------------------------------------


def test_digits_are_written_deterministically(digits_root, tmp_path):
    again = ensure_digits(tmp_path / "other-cache")
    assert again == tmp_path / "other-cache" / VERSION
    first, second = files_of(digits_root), files_of(again)
    assert len(first) == TRAIN_IMAGES + VAL_IMAGES + 1  # + the COMPLETE marker
    assert first.keys() == second.keys()
    different = [name for name in first if first[name] != second[name]]
    assert not different, f"{len(different)} files differ, e.g. {different[:3]}"
    # No staging folder is left behind.
    assert [p.name for p in (tmp_path / "other-cache").iterdir()] == [VERSION]


def test_digits_layout(digits_root):
    assert class_names(digits_root) == DIGIT_CLASSES
    for split, expected in (("train", TRAIN_IMAGES), ("val", VAL_IMAGES)):
        files = sorted((digits_root / split).glob("*/*"))
        assert len(files) == expected
        assert all(f.suffix == ".JPEG" for f in files)
        assert sorted({f.parent.name for f in files}) == DIGIT_CLASSES
        for f in files[:: 37]:
            with Image.open(f) as image:
                assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (32, 32))
    # Every class has 4x as many training images as validation images (+-1 for the remainder).
    for cls in DIGIT_CLASSES:
        n_train = len(list((digits_root / "train" / cls).iterdir()))
        n_val = len(list((digits_root / "val" / cls).iterdir()))
        assert n_val == (n_train + n_val) // 5


def test_digits_second_call_reuses_the_copy(digits_root):
    marker = digits_root / "COMPLETE"
    stamp = marker.stat().st_mtime_ns
    assert ensure_digits(digits_root.parent) == digits_root
    assert marker.stat().st_mtime_ns == stamp


def test_digits_images_show_the_digit(digits_root):
    # A decoded image is a bright stroke on black, centred: not noise, not blank.
    path = next((digits_root / "val" / "digit_0").iterdir())
    image = torch.from_numpy(np.array(load_rgb(str(path)))).float()
    assert image.shape == (32, 32, 3)
    assert (image[..., 0] - image[..., 1]).abs().max() <= 2 and (image[..., 1] - image[..., 2]).abs().max() <= 2  # grey
    assert image.max() > 150 and image.min() < 30


# --- ImageNet-layout folders ----------------------------------------------------------


def test_image_folder_reads_a_tiny_imagenet_layout(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "tiny", classes=("n02", "n01", "n03"), per_class=3)
    (root / "train" / "n01" / "notes.txt").write_text("not an image")
    assert class_names(root) == ["n01", "n02", "n03"]
    train = image_folder(root, "train")
    assert len(train) == 9
    assert train.classes == ["n01", "n02", "n03"]
    image, label = train[0]
    assert image.mode == "RGB" and image.size == (40, 36) and label == 0


def test_non_rgb_images_are_converted(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "tiny", per_class=1)
    Image.new("L", (20, 10), 128).save(root / "train" / "cat" / "grey.png")
    Image.new("RGBA", (20, 10), (1, 2, 3, 4)).save(root / "train" / "cat" / "alpha.png")
    images = [image_folder(root, "train")[i][0] for i in range(3)]
    assert all(image.mode == "RGB" for image in images)


def no_root(root: Path) -> Path:
    return root / "absent"


def no_train_split(root: Path) -> Path:
    (root / "train").rename(root / "training")
    return root


def no_class_folders(root: Path) -> Path:
    for folder in (root / "train").iterdir():
        folder.rename(root / folder.name)
    return root


@pytest.mark.parametrize(
    "damage,message",
    [(no_root, "absent' does not exist"), (no_train_split, "train' is missing"), (no_class_folders, "train' has no class folders")],
)
def test_folder_problems_are_named(tmp_path, make_image_folder, damage, message):
    root = damage(make_image_folder(tmp_path / "tiny", per_class=1))
    with pytest.raises(DataError, match=message):
        image_folder(root, "train")


def test_class_folder_without_images_is_named(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "tiny", per_class=1)
    empty = root / "train" / "empty_class"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="empty_class.*has no images"):
        image_folder(root, "train")


def test_corrupt_and_truncated_images_are_named(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "tiny", per_class=1, size=(64, 64))
    good = root / "train" / "cat" / "000.JPEG"
    corrupt = root / "train" / "cat" / "corrupt.JPEG"
    corrupt.write_bytes(b"\xff\xd8 this is no jpeg" * 20)
    truncated = root / "train" / "dog" / "truncated.JPEG"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for path in (corrupt, truncated):
        with pytest.raises(DataError, match=f"{path.name}.*corrupt or truncated"):
            load_rgb(str(path))
    assert load_rgb(str(good)).size == (64, 64)


# --- loaders --------------------------------------------------------------------------


def digits_cfg(root: Path, workers: int) -> DataConfig:
    return DataConfig(root=str(root), image_size=32, batch_size=64, workers=workers, crop_scale=[0.5, 1.0], hflip=True, val_crop_ratio=1.0)


def first_batches(bundle, seed: int, epoch: int, n: int = 3, global_seed: int = 0):
    """The first ``n`` training batches of ``epoch``, with the global RNG in some other state
    (the loader must not depend on it)."""
    torch.manual_seed(global_seed)
    bundle.start_epoch(epoch)
    return list(itertools.islice(iter(bundle.train), n))


def same_batches(a, b) -> bool:
    return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya, _), (xb, yb, _) in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_are_a_function_of_seed_and_epoch(digits_root, workers):
    bundle = build_loaders(digits_cfg(digits_root, workers), seed=7)
    assert bundle.classes == DIGIT_CLASSES
    assert len(bundle.train) == TRAIN_IMAGES // 64  # drop_last
    epoch1 = first_batches(bundle, 7, 1, global_seed=1)
    epoch1_again = first_batches(bundle, 7, 1, global_seed=2)
    epoch2 = first_batches(bundle, 7, 2, global_seed=1)
    assert epoch1[0][0].shape == (64, 3, 32, 32)
    assert same_batches(epoch1, epoch1_again)
    assert not torch.equal(epoch1[0][1], epoch2[0][1])  # another order of images
    # A fresh loader pair (a resumed run) sees the same batches; another seed does not.
    fresh = build_loaders(digits_cfg(digits_root, workers), seed=7)
    assert same_batches(epoch1, first_batches(fresh, 7, 1, global_seed=3))
    other_seed = build_loaders(digits_cfg(digits_root, workers), seed=8)
    assert not torch.equal(epoch1[0][1], first_batches(other_seed, 8, 1)[0][1])


def test_batches_do_not_depend_on_the_worker_count(digits_root):
    batches = [first_batches(build_loaders(digits_cfg(digits_root, workers), seed=3), 3, 0, n=2) for workers in (0, 2)]
    assert same_batches(*batches)


def test_training_augmentation_changes_with_the_epoch(digits_root):
    bundle = build_loaders(digits_cfg(digits_root, 0), seed=0)
    crops = []
    for epoch in (0, 1):
        bundle.start_epoch(epoch)
        crops.append(bundle.train.samples[0][0])
    assert crops[0].shape == (3, 32, 32)
    assert not torch.equal(crops[0], crops[1])  # two random crops of one image


def test_val_loader_is_fixed_and_complete(digits_root):
    cfg = digits_cfg(digits_root, 0)
    loader = build_val_loader(cfg, digits_root)
    labels_a = torch.cat([y for _, y in loader])
    labels_b = torch.cat([y for _, y in loader])
    assert labels_a.numel() == VAL_IMAGES
    assert torch.equal(labels_a, labels_b)
    assert torch.equal(labels_a, labels_a.sort().values)  # folder order, no shuffling
    assert torch.bincount(labels_a).tolist() == [35, 36, 35, 36, 36, 36, 36, 35, 34, 36]


@pytest.mark.parametrize("length,world", [(10, 1), (10, 3), (7, 2), (2, 4)])
def test_shard_sampler_partitions_the_indices(length, world):
    shards = [list(ShardSampler(length, rank, world)) for rank in range(world)]
    assert sorted(itertools.chain(*shards)) == list(range(length))
    assert [len(ShardSampler(length, rank, world)) for rank in range(world)] == [len(s) for s in shards]


def test_val_resize_size():
    assert val_resize_size(224, 0.875) == 256
    assert val_resize_size(32, 1.0) == 32
