"""``distq data pack`` and ``data.format=shards``: the shards hold the folder's images and labels,
both loaders read them in the sharded epoch order (every sample once per epoch across ranks,
validation every image once), and bad shards are one-line errors naming the file."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from distq.cli import main
from distq.config import ConfigError, load_config
from distq.config.schema import DataConfig
from distq.data import BatchLayout, DataError, image_folder
from distq.data.bundle import sample_seed
from distq.data.loaders import build_loaders
from distq.data.order import EpochOrder, shard_order
from distq.data.pack import pack, parse_size
from distq.data.shards import INDEX, ShardsFolder

DIGITS_TRAIN, DIGITS_VAL = 1442, 355
LOADERS = ["torchvision", pytest.param("dali", marks=pytest.mark.skipif(not __import__("importlib").util.find_spec("nvidia.dali"), reason="no DALI"))]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of a tar, read with the standard library alone."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def packed(shards: Path, split: str) -> list[tuple[bytes, int]]:
    """Every (image bytes, label) of a split, in packed order."""
    index = json.loads((shards / INDEX).read_text())
    out = []
    for shard in index["splits"][split]["shards"]:
        samples = tar_samples(shards / shard["tar"])
        assert len(samples) == shard["samples"]
        out += [(s["jpg"], int(s["cls"])) for _, s in sorted(samples.items())]
    return out


# --- pack -------------------------------------------------------------------------------------


def test_pack_holds_each_image_once_with_its_folder_label(digits_root, digits_shards):
    index = json.loads((digits_shards / INDEX).read_text())
    assert index["classes"] == [f"digit_{i}" for i in range(10)] and index["label_digits"] == 1
    for split, count in (("train", DIGITS_TRAIN), ("val", DIGITS_VAL)):
        folder = Counter((sha(Path(path).read_bytes()), label) for path, label in image_folder(digits_root, split).samples)
        samples = packed(digits_shards, split)
        assert index["splits"][split]["samples"] == len(samples) == count
        assert Counter((sha(image), label) for image, label in samples) == folder  # byte-identical images, the folder path's labels
    # Validation keeps folder order (labels ascending); training is shuffled across classes.
    assert [label for _, label in packed(digits_shards, "val")] == sorted(label for _, label in packed(digits_shards, "val"))
    first_shard = [label for _, label in packed(digits_shards, "train")[:50]]
    assert len(set(first_shard)) == 10


def test_pack_writes_dali_index_files_like_wds2idx_and_checksums(digits_shards, tmp_path):
    wds2idx = pytest.importorskip("wds2idx")
    index = json.loads((digits_shards / INDEX).read_text())
    for shard in index["splits"]["train"]["shards"][:3] + index["splits"]["val"]["shards"][-1:]:
        tar = digits_shards / shard["tar"]
        with wds2idx.IndexCreator(str(tar), str(tmp_path / "reference.idx"), verbose=False) as creator:
            creator.create_index()
        assert (digits_shards / shard["index"]).read_text() == (tmp_path / "reference.idx").read_text()
        assert shard["bytes"] == tar.stat().st_size and shard["sha256"] == sha(tar.read_bytes())
    sizes = [s["bytes"] for s in index["splits"]["train"]["shards"]]
    assert max(sizes) <= 150_000 and len(sizes) == 30  # the fixture's shard size, DIGITS_SHARD_BYTES


def test_pack_is_reproducible_and_refuses_a_full_folder(digits_root, tmp_path, capsys):
    a = pack(digits_root, tmp_path / "a", shard_bytes=parse_size("0.5MB"), progress=False)
    b = pack(digits_root, tmp_path / "b", shard_bytes=500_000, progress=False)
    assert [s["sha256"] for s in a["splits"]["train"]["shards"]] == [s["sha256"] for s in b["splits"]["train"]["shards"]]
    assert main(["data", "pack", str(digits_root), "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"distq: error: '{tmp_path / 'a'}' already holds a complete pack ({INDEX}): delete it, or choose another --out, to pack again"
    ]


def test_pack_stores_odd_images_as_rgb_jpegs(tmp_path, make_image_folder):
    from PIL import Image

    root = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=2)
    Image.new("CMYK", (20, 10), (0, 50, 100, 0)).save(root / "train" / "a" / "cmyk.JPEG", "JPEG")
    Image.new("RGB", (20, 10), (9, 9, 9)).save(root / "train" / "b" / "png.JPEG", "PNG")
    index = pack(root, tmp_path / "shards", progress=False)
    assert index["reencoded"] == {"CMYK JPEG": 1, "PNG saved as JPEG": 1}
    for image, _ in packed(tmp_path / "shards", "train"):
        with Image.open(__import__("io").BytesIO(image)) as decoded:
            assert (decoded.format, decoded.mode) == ("JPEG", "RGB")


@pytest.mark.parametrize("text,size", [("1GB", 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("123", 123), ("0.5 MB", 500_000)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_parse_size_names_a_bad_size():
    with pytest.raises(DataError, match="shard size '1 potato' is not a size"):
        parse_size("1 potato")


# --- the order --------------------------------------------------------------------------------


def test_shard_order_visits_each_shard_once_and_each_sample_once():
    sizes = [5, 7, 3, 6]
    starts = np.cumsum([0] + sizes)
    orders = [shard_order(sizes, seed=1, epoch=e).tolist() for e in range(4)]
    for order in orders:
        assert sorted(order) == list(range(sum(sizes)))
        shards = [int(np.searchsorted(starts, i, side="right")) - 1 for i in order]
        runs = [s for s, _ in itertools.groupby(shards)]
        assert sorted(runs) == list(range(len(sizes)))  # one run per shard
    assert len({tuple(o) for o in orders}) == 4  # reshuffled every epoch
    assert shard_order(sizes, 1, 2).tolist() == orders[2]  # a function of (seed, epoch)


@pytest.mark.parametrize("layout", [BatchLayout(32, 1, 2), BatchLayout(16, 2, 2), BatchLayout(8, 1, 8)])
def test_a_steps_samples_do_not_depend_on_the_process_count(layout):
    order = EpochOrder(1442, 3, tuple([53] * 27 + [11]))
    steps = 1442 // 64

    def per_step(lay):
        ranks = [order.rank_samples(2, lay, r) for r in range(lay.world)]
        size = lay.grad_accum * lay.micro_batch
        return [set().union(*(r[k * size : (k + 1) * size] for r in ranks)) for k in range(steps)]

    assert per_step(layout) == per_step(BatchLayout(64))


# --- loaders ----------------------------------------------------------------------------------


def shards_cfg(root: Path, loader: str, **overrides) -> DataConfig:
    values = dict(root=str(root), format="shards", loader=loader, image_size=32, batch_size=64, workers=0, crop_scale=[0.5, 1.0], val_crop_ratio=1.0)
    return DataConfig(**(values | overrides))


def epoch(bundle, number: int, start_step: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    bundle.start_epoch(number, start_step)
    return [(x.clone(), y.clone(), i.clone()) for x, y, i in bundle.train]


@pytest.mark.parametrize("loader", LOADERS)
def test_two_ranks_use_every_sample_once_per_epoch_with_its_label(digits_shards, loader):
    labels = torch.tensor([label for _, label in packed(digits_shards, "train")])
    cfg = shards_cfg(digits_shards, loader, batch_size=32)
    ranks = [build_loaders(cfg, seed=4, layout=BatchLayout(32, 1, 2), rank=r) for r in (0, 1)]
    assert ranks[0].classes == [f"digit_{i}" for i in range(10)]
    used = []
    for bundle in ranks:
        batches = epoch(bundle, 1)
        assert len(batches) == len(bundle.train) == DIGITS_TRAIN // 64
        for images, y, indices in batches:
            assert images.shape == (32, 3, 32, 32) and torch.equal(y, labels[indices])
            used += indices.tolist()
    assert len(used) == len(set(used)) == (DIGITS_TRAIN // 64) * 64
    one = build_loaders(shards_cfg(digits_shards, loader), seed=4, layout=BatchLayout(64), rank=0)
    one_process = [i for _, _, idx in epoch(one, 1) for i in idx.tolist()]
    assert set(used) == set(one_process)  # the same samples as on one process
    other_epoch = [i for _, _, idx in epoch(ranks[0], 2) for i in idx.tolist()]
    assert other_epoch[:32] != [i for _, _, idx in epoch(ranks[0], 1) for i in idx.tolist()][:32]


@pytest.mark.parametrize("loader", LOADERS)
def test_two_ranks_count_every_val_image_once(digits_shards, loader):
    labels = [label for _, label in packed(digits_shards, "val")]
    cfg = shards_cfg(digits_shards, loader, batch_size=50)
    seen = []
    for rank in (0, 1):
        bundle = build_loaders(cfg, seed=0, layout=BatchLayout(50, 1, 2), rank=rank)
        batches = list(bundle.val)
        assert len(batches) == len(bundle.val)
        seen += [(int(y), round(float(x.double().sum()), 3)) for images, ys in batches for x, y in zip(images, ys)]
    assert len(seen) == DIGITS_VAL
    assert Counter(y for y, _ in seen) == Counter(labels)
    whole = list(build_loaders(cfg, seed=0, layout=BatchLayout(50), rank=0).val)
    assert Counter(seen) == Counter((int(y), round(float(x.double().sum()), 3)) for images, ys in whole for x, y in zip(images, ys))


def test_dali_and_torchvision_read_the_same_samples_in_the_same_order(digits_shards):
    pytest.importorskip("nvidia.dali")
    tv = epoch(build_loaders(shards_cfg(digits_shards, "torchvision"), seed=2, layout=BatchLayout(32, 2, 1)), 3)
    dali = epoch(build_loaders(shards_cfg(digits_shards, "dali"), seed=2, layout=BatchLayout(32, 2, 1)), 3)
    assert len(tv) == len(dali) == 2 * (DIGITS_TRAIN // 64)
    for (_, y, i), (x, y2, i2) in zip(tv, dali):
        assert torch.equal(i, i2) and torch.equal(y, y2) and x.shape == (32, 3, 32, 32)


@pytest.mark.parametrize("loader", LOADERS)
def test_a_mid_epoch_start_reads_the_rest_of_the_epoch_crop_for_crop(digits_shards, loader):
    cfg = shards_cfg(digits_shards, loader)
    whole = epoch(build_loaders(cfg, seed=5), 1)
    resumed = epoch(build_loaders(cfg, seed=5), 1, start_step=9)
    assert len(resumed) == len(whole) - 9
    for (x, y, i), (x2, y2, i2) in zip(whole[9:], resumed):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(i, i2)


def test_shards_train_like_folders_on_the_same_images(digits_root, digits_shards):
    """A sample's crop comes from (seed, epoch, index): the shards' first sample, cropped with
    the index its folder copy has, is the folder path's tensor."""
    folder_cfg = DataConfig(root=str(digits_root), image_size=32, batch_size=64, workers=0, crop_scale=[0.5, 1.0], val_crop_ratio=1.0)
    folders = build_loaders(folder_cfg, seed=1)
    shards = build_loaders(shards_cfg(digits_shards, "torchvision"), seed=1)
    image, label = packed(digits_shards, "train")[0]
    position = next(n for n, (path, _) in enumerate(image_folder(digits_root, "train").samples) if Path(path).read_bytes() == image)
    folders.start_epoch(0)
    shards.start_epoch(0)
    x, y, _ = folders.train.samples[position]  # seeded with (seed 1, epoch 0, its index in the folder)
    torch.default_generator.manual_seed(sample_seed(1, 0, position))
    x2, y2 = shards.train.samples.dataset[0]  # the shards' dataset, seeded as the folder's sample was
    assert y == y2 == label and torch.equal(x, x2)


# --- bad input: one line naming the file --------------------------------------------------------


@pytest.fixture
def shards_copy(digits_shards, tmp_path) -> Path:
    return Path(shutil.copytree(digits_shards, tmp_path / "shards"))


def first_train_shard(root: Path) -> dict:
    return json.loads((root / INDEX).read_text())["splits"]["train"]["shards"][0]


def missing_shard(root: Path) -> str:
    (root / first_train_shard(root)["tar"]).unlink()
    return f"shard file '{root / first_train_shard(root)['tar']}' listed in {INDEX} is missing: restore it or re-run distq data pack"


def truncated_shard(root: Path) -> str:
    shard = first_train_shard(root)
    tar = root / shard["tar"]
    tar.write_bytes(tar.read_bytes()[:4096])
    return f"shard file '{tar}' has 4096 bytes, {INDEX} says {shard['bytes']} (truncated or overwritten): restore it or re-run distq data pack"


def index_of_other_shards(root: Path) -> str:
    index = json.loads((root / INDEX).read_text())
    entry = index["splits"]["train"]["shards"][2]
    entry["samples"] += 1
    index["splits"]["train"]["samples"] += 1
    (root / INDEX).write_text(json.dumps(index))
    return f"{INDEX} says shard '{root / entry['tar']}' has {entry['samples']} samples but its index file {entry['index']} lists {entry['samples'] - 1}: re-run distq data pack"


def sample_without_label(root: Path) -> str:
    """A shard (as another tool might write it) whose sample 000003 lacks its .cls, with a correct
    DALI index (wds2idx) and index.json entry: the loaders refuse it when they open the folder."""
    import webdataset as wds
    wds2idx = pytest.importorskip("wds2idx")

    index = json.loads((root / INDEX).read_text())
    entry = index["splits"]["train"]["shards"][0]
    tar = root / entry["tar"]
    samples = tar_samples(tar)
    with wds.TarWriter(str(tar), encoder=False) as writer:
        for key, sample in sorted(samples.items()):
            writer.write({"__key__": key, **({"jpg": sample["jpg"]} if key.endswith("03") else sample)})
    with wds2idx.IndexCreator(str(tar), str(root / entry["index"]), verbose=False) as creator:
        creator.create_index()
    entry.update(bytes=tar.stat().st_size, sha256=sha(tar.read_bytes()))
    (root / INDEX).write_text(json.dumps(index))
    return f"shard file '{tar}': sample 000003 has no label (no 000003.cls): re-run distq data pack"


def no_index_json(root: Path) -> str:
    (root / INDEX).unlink()
    return f"'{root / INDEX}' not found: data.format=shards needs data.root to be a folder written by 'distq data pack ROOT --out SHARDS'"


@pytest.mark.parametrize("damage", [missing_shard, truncated_shard, index_of_other_shards, sample_without_label, no_index_json])
@pytest.mark.parametrize("loader", LOADERS)
def test_bad_shards_are_one_line_naming_the_file(shards_copy, damage, loader):
    message = damage(shards_copy)
    with pytest.raises(DataError) as error:
        build_loaders(shards_cfg(shards_copy, loader), seed=0)
    assert str(error.value) == message


def test_a_corrupt_image_in_a_shard_is_named_when_read(shards_copy):
    shard = first_train_shard(shards_copy)
    tar = shards_copy / shard["tar"]
    data = bytearray(tar.read_bytes())
    line = (shards_copy / shard["index"]).read_text().splitlines()[1].split()  # cls o s name jpg o s name
    offset = int(line[5])
    data[offset : offset + 400] = b"\x00" * 400  # the JPEG header of sample 0
    tar.write_bytes(bytes(data))
    split = ShardsFolder.open(shards_copy).split("train")
    with pytest.raises(DataError, match=rf"sample {line[3].split('.')[0]} \(number 0\) of shard file '{tar}' is corrupt or truncated"):
        split.decode(0)


def test_bad_shards_through_the_command_line_are_one_line(shards_copy, tmp_path, capsys, tiny_args):
    message = truncated_shard(shards_copy)
    code = main([str(a) for a in tiny_args(tmp_path / "run", "data.format=shards", f"data.root={shards_copy}")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"distq: error: {message}"]


def test_shards_format_needs_a_root():
    with pytest.raises(ConfigError, match="data.format=shards needs data.root: a folder written by 'distq data pack ROOT --out SHARDS'"):
        load_config(None, ["data.format=shards"])
    with pytest.raises(ConfigError, match="data.format='tar' is not allowed: use one of 'folders', 'shards'"):
        load_config(None, ["data.format=tar"])


def test_verify_checks_a_shards_folder_and_its_checksums(shards_copy, digits_root, capsys):
    assert main(["data", "verify", str(shards_copy)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"verify {shards_copy} (shards)"
    for split in ("train", "val"):  # the counts of the folders packed
        counts = {c.name: len(list(c.iterdir())) for c in sorted((digits_root / split).iterdir())}
        at = lines.index(f"{split}: {sum(counts.values())} images in 10 classes, {min(counts.values())}..{max(counts.values())} per class")
        assert lines[at + 1 : at + 11] == [f"  {name}: {n}" for name, n in counts.items()]
    index = json.loads((shards_copy / INDEX).read_text())
    shards = sum(len(entry["shards"]) for entry in index["splits"].values())
    assert lines[-1] == f"{shards} shards, checksums match index.json"
    shard = shards_copy / first_train_shard(shards_copy)["tar"]
    data = bytearray(shard.read_bytes())
    data[-3000] ^= 0xFF  # same size, other bytes: only the checksum sees it
    shard.write_bytes(bytes(data))
    assert main(["data", "verify", str(shards_copy)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"checksum differs from index.json: {shard}" in lines
    assert lines[-1] == f"1 of {shards} shards are damaged: restore them or re-run distq data pack"


def test_batches_do_not_depend_on_the_worker_count(digits_shards):
    batches = [epoch(build_loaders(shards_cfg(digits_shards, "torchvision", workers=workers), seed=3), 0)[:3] for workers in (0, 2)]
    for (x, y, i), (x2, y2, i2) in zip(*batches):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(i, i2)


def test_plan_counts_the_training_images_from_index_json(digits_shards):
    from distq.plan import plan_lines

    cfg = load_config(Path(__file__).parents[2] / "configs" / "digits_w4a4.yaml", ["data.format=shards", f"data.root={digits_shards}"])
    assert f"({DIGITS_TRAIN} train images from index.json" in "\n".join(plan_lines(cfg))
