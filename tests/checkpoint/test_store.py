"""Checkpoint folders, manifests and the choice of the checkpoint to resume from."""

from __future__ import annotations

import json

import pytest
import torch

from distq.checkpoint import CheckpointError, CheckpointStore, load_state, save_tensors, tag_for
from distq.checkpoint.files import file_record
from distq.checkpoint.manifest import FORMAT_VERSION, LATEST, MANIFEST
from distq.checkpoint.store import STATE, optimizer_file


def write_checkpoint(store: CheckpointStore, step: int, world: int = 2, commit: bool = True) -> dict:
    """A checkpoint of ``step`` as the trainer writes it: state.pt and one shard per rank."""
    tag = tag_for(step)
    folder = store.begin(tag)
    state = {"format": FORMAT_VERSION, "config": {}, "classes": ["a"], "step": step, "models": {"model": {"w": torch.full((64,), float(step))}}}
    files = {STATE: save_tensors(state, folder / STATE)}
    for rank in range(world):
        name = optimizer_file(rank, world)
        files[name] = save_tensors({"w": {"numel": 64, "start": 32 * rank, "tensors": {}, "scalars": {}}}, folder / name)
    if commit:
        store.commit(tag, world, files, {"step": step, "epoch": step // 10, "global_batch": 8})
    return files


@pytest.fixture
def store(tmp_path):
    return CheckpointStore(tmp_path / "run")


def test_commit_writes_the_manifest_with_every_file_size_and_checksum(store):
    files = write_checkpoint(store, 10)
    manifest = json.loads((store.root / tag_for(10) / MANIFEST).read_text())
    assert manifest == json.loads((store.root / LATEST).read_text())
    assert manifest["tag"] == "step_00000010" and manifest["world_size"] == 2 and manifest["format"] == FORMAT_VERSION
    assert set(manifest["files"]) == {STATE, "optim-00000-of-00002.pt", "optim-00001-of-00002.pt"}
    for name, record in manifest["files"].items():
        on_disk = file_record(store.root / tag_for(10) / name)  # independent: read back from disk
        assert (record["size"], record["sha256"]) == (on_disk.size, on_disk.sha256) == (files[name].size, files[name].sha256)


def test_find_takes_the_newest_complete_checkpoint(store):
    assert store.find() is None
    write_checkpoint(store, 10)
    write_checkpoint(store, 20)
    found = store.find()
    assert found.folder.name == tag_for(20) and found.skipped == []
    assert load_state(found.folder)["step"] == 20
    assert load_state(store.root.parent)["step"] == 20  # a run directory works as well


def test_an_incomplete_checkpoint_is_passed_over_with_one_line(store):
    write_checkpoint(store, 10)
    write_checkpoint(store, 20, commit=False)  # killed before its manifest
    found = store.find()
    assert found.folder.name == tag_for(10)
    assert found.skipped == ["step_00000020 is incomplete (no manifest: its writing was interrupted)"]


@pytest.mark.parametrize("damage", ["truncated", "missing", "flipped"])
def test_a_damaged_shard_falls_back_to_the_previous_checkpoint(store, damage):
    write_checkpoint(store, 10)
    write_checkpoint(store, 20)
    shard = store.root / tag_for(20) / "optim-00001-of-00002.pt"
    data = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    found = store.find()
    assert found.folder.name == tag_for(10)
    (line,) = found.skipped
    want = {
        "truncated": f"step_00000020 cannot be used: optim-00001-of-00002.pt has {len(data) // 2} bytes, the manifest says {len(data)}",
        "missing": "step_00000020 cannot be used: optim-00001-of-00002.pt is missing",
        "flipped": "step_00000020 cannot be used: optim-00001-of-00002.pt does not match its checksum (damaged)",
    }[damage]
    assert line.startswith(want)


def test_latest_naming_a_missing_checkpoint_falls_back(store):
    write_checkpoint(store, 10)
    write_checkpoint(store, 20)
    import shutil

    shutil.rmtree(store.root / tag_for(20))
    found = store.find()
    assert found.folder.name == tag_for(10)
    assert found.skipped == [f"step_00000020 cannot be used: its folder {store.root / tag_for(20)} is missing"]


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(store):
    write_checkpoint(store, 10)
    (store.root / tag_for(10) / STATE).unlink()
    with pytest.raises(CheckpointError, match=r"has no complete checkpoint to resume from \(step_00000010 cannot be used: state.pt is missing\)"):
        store.find()


def test_a_checkpoint_from_a_newer_distq_is_refused(store):
    write_checkpoint(store, 10)
    latest = store.root / LATEST
    latest.write_text(latest.read_text().replace(f'"format": {FORMAT_VERSION}', f'"format": {FORMAT_VERSION + 1}'))
    with pytest.raises(CheckpointError, match=f"has format {FORMAT_VERSION + 1}, newer than this distq's \\({FORMAT_VERSION}\\): resume it with a newer distq"):
        store.find()


def test_an_unreadable_latest_falls_back_to_the_tag_manifests(store):
    write_checkpoint(store, 10)
    (store.root / LATEST).write_text('{"tag": "step_')
    found = store.find()
    assert found.folder.name == tag_for(10)
    assert len(found.skipped) == 1 and found.skipped[0].startswith(f"{store.root / LATEST} is unreadable")


def test_prune_keeps_the_newest_and_only_after_they_are_committed(store):
    for step in (10, 20, 30):
        write_checkpoint(store, step)
    write_checkpoint(store, 40, commit=False)
    store.prune(keep=2)
    assert sorted(p.name for p in store.root.iterdir()) == [LATEST, tag_for(20), tag_for(30)]


def test_begin_clears_a_folder_left_by_an_interrupted_attempt(store):
    write_checkpoint(store, 10, world=3, commit=False)
    write_checkpoint(store, 10, world=2)
    assert sorted(p.name for p in (store.root / tag_for(10)).iterdir()) == [MANIFEST, "optim-00000-of-00002.pt", "optim-00001-of-00002.pt", STATE]


def test_an_older_single_file_checkpoint_is_not_silently_restarted(store):
    store.root.mkdir(parents=True)
    torch.save({"format": 1, "config": {}, "models": {}}, store.root / "last.pt")
    with pytest.raises(CheckpointError, match="holds a checkpoint of an older distq"):
        store.find()
    assert load_state(store.root / "last.pt")["format"] == 1  # eval and export still read it


def test_a_manifest_written_just_before_a_crash_counts_even_if_latest_lags(store):
    write_checkpoint(store, 10)
    latest = (store.root / LATEST).read_text()
    write_checkpoint(store, 20)
    (store.root / LATEST).write_text(latest)  # killed between the tag's manifest and latest.json
    found = store.find()
    assert found.folder.name == tag_for(20) and found.skipped == []
