"""Training from shards (``data.format=shards``, the digits packed by ``distq data pack``):

- the same classes and the same accuracy band as from the folders, with the torchvision and the
  DALI loader, on 1 and 2 processes, every training sample used exactly once per epoch across
  ranks (the per-sample log);
- a run resumed mid-epoch on another number of processes still uses every sample once per
  epoch (a kill mid-epoch and resume on the same number ends bitwise equal: test_resume.py);
- export and predict carry the class names from the dataset's table.
"""

from __future__ import annotations

import json

import pytest

from distq.train.sample_log import read_sample_log

DIGITS_TRAIN = 1442
EPOCHS = 4
GLOBAL_BATCH = 64
# Full precision at width 8 reaches ~97% on the digits in 4 epochs (a minute on one core).
RUN = ("train", "configs/digits_fp.yaml", "model.width=8", f"train.epochs={EPOCHS}", f"train.global_batch={GLOBAL_BATCH}", "data.batch_size=64",
       "data.workers=0", "log.progress=false", "log.tensorboard=false", "log.samples=true")  # fmt: skip
BAND = 3.0  # val top-1 points between a shards run and the folder run of the same loader
MIN_TOP1 = 93.0


def has_dali() -> bool:
    import importlib.util

    return importlib.util.find_spec("nvidia.dali") is not None


LOADERS = ["torchvision", pytest.param("dali", marks=pytest.mark.skipif(not has_dali(), reason="no DALI"))]


def results(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def assert_each_sample_once_per_epoch(run_dir, epochs: int = EPOCHS) -> None:
    used = read_sample_log(run_dir)
    assert sorted(used) == list(range(epochs))
    for epoch, indices in used.items():
        assert len(indices) == len(set(indices)) == (DIGITS_TRAIN // GLOBAL_BATCH) * GLOBAL_BATCH, epoch
        assert set(indices) <= set(range(DIGITS_TRAIN))


@pytest.fixture(scope="module")
def folder_runs(tmp_path_factory, digits_root, run_distq):
    """{loader: run dir} of the folder runs the shard runs are compared with (1 process)."""
    runs = {}
    for loader in ("torchvision", "dali") if has_dali() else ("torchvision",):
        run_dir = tmp_path_factory.mktemp(f"folders-{loader}") / "run"
        done = run_distq(*RUN, f"data.loader={loader}", f"run.dir={run_dir}", timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[loader] = run_dir
    return runs


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("loader", LOADERS)
def test_shards_train_like_folders(loader, processes, folder_runs, digits_shards, tmp_path, torchrun, checkpoint_of):
    run_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    args = (*RUN, f"data.loader={loader}", "data.format=shards", f"data.root={digits_shards}", f"run.dir={run_dir}")
    assert torchrun(processes, *args, log=log) == 0, log.read_text()[-3000:]
    got, want = results(run_dir), results(folder_runs[loader])
    assert got["world_size"] == processes and got["steps"] == want["steps"] == EPOCHS * (DIGITS_TRAIN // GLOBAL_BATCH)
    assert checkpoint_of(run_dir)["classes"] == checkpoint_of(folder_runs[loader])["classes"] == [f"digit_{i}" for i in range(10)]
    assert got["val/top1"] >= MIN_TOP1 and want["val/top1"] >= MIN_TOP1, (got, want)
    assert abs(got["val/top1"] - want["val/top1"]) <= BAND, (got, want)
    assert_each_sample_once_per_epoch(run_dir)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_shards_run_resumes_mid_epoch_on_another_number_of_processes(tmp_path, torchrun, digits_shards, checkpoint_of):
    run_dir = tmp_path / "run"
    args = ("train", "configs/digits_w4a4.yaml", "model.width=4", "data.batch_size=32", f"train.global_batch={GLOBAL_BATCH}", "data.workers=0",
            "train.epochs=2", "log.progress=false", "log.tensorboard=false", "log.samples=true", "run.save_every_steps=4",
            "data.format=shards", f"data.root={digits_shards}", f"run.dir={run_dir}")  # fmt: skip
    assert torchrun(2, *args, log=tmp_path / "killed.log", env={"DISTQ_KILL_AT": "after-commit@1.5"}) != 0
    resumed = tmp_path / "resumed.log"
    assert torchrun(1, *args, "--resume", "auto", log=resumed) == 0, resumed.read_text()[-3000:]
    text = resumed.read_text()
    assert "(14 of 22 steps into epoch 2); written by 2 process(es), now 32 images per process x 2 accumulation steps x 1 process, global batch 64 kept" in text
    assert checkpoint_of(run_dir)["step"] == 2 * 22
    assert_each_sample_once_per_epoch(run_dir, epochs=2)


@pytest.mark.slow
def test_export_and_predict_name_the_classes_of_a_prepared_dataset(tmp_path, make_image_folder, tiny_args, run_distq, capsys):
    """class_names.json (written by distq data prepare) travels into index.json (pack), the export
    header (export) and the predictions (predict)."""
    from distq.cli import main
    from distq.data.pack import pack

    names = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus"}
    root = make_image_folder(tmp_path / "data", classes=tuple(names), per_class=16, size=(32, 32))
    (root / "class_names.json").write_text(json.dumps(names))
    shards = tmp_path / "shards"
    assert pack(root, shards, progress=False)["class_names"] == names
    run_dir = tmp_path / "run"
    done = run_distq(*tiny_args(run_dir, "data.format=shards", f"data.root={shards}", "data.batch_size=16", "train.epochs=1", "train.warmup_epochs=0"))
    assert done.returncode == 0, done.stderr
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0  # evaluates on the shards' val split
    assert json.loads(capsys.readouterr().out)["val/top1"] == json.loads((run_dir / "results.json").read_text())["val/top1"]
    assert main(["export", str(run_dir), "--out", str(tmp_path / "model.safetensors")]) == 0
    from distq.export.format import read_export

    header = read_export(tmp_path / "model.safetensors").header
    assert header["classes"] == list(names) and header["class_names"] == list(names.values())
    capsys.readouterr()
    image = next((root / "val" / "n01443537").iterdir())
    assert main(["predict", "--json", str(tmp_path / "model.safetensors"), str(image)]) == 0
    top = json.loads(capsys.readouterr().out)["top5"]
    assert {(t["class"], t["name"]) for t in top} == set(names.items())
    assert main(["predict", str(tmp_path / "model.safetensors"), str(image)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert {line.split(". ", 1)[1].rsplit(" ", 1)[0].strip() for line in lines[1:]} == {f"{w} {n}" for w, n in names.items()}
