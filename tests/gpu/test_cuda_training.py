"""The default job on a CUDA GPU, with the GPU defaults (bf16 autocast, channels-last batches):
it must learn as well as on the CPU. Run with ``pytest -m gpu`` on a GPU machine."""

import json

import pytest
import torch

from distq.config import config_from_dict
from distq.distributed.engine import TeamModule, TorchEngine
from distq.distributed.env import DistEnv
from distq.quant import QAct, QConv2d

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_engine_defaults_on_cuda_are_bf16_and_channels_last():
    cfg = config_from_dict({})
    model = torch.nn.Sequential(QConv2d(3, 8, 3, padding=1, bits=4), QAct(4), torch.nn.Conv2d(8, 4, 1))
    engine = TorchEngine(TeamModule(torch.nn.ModuleDict({"m": model}), torch.nn.ModuleDict()),
                         torch.optim.SGD(model.parameters(), lr=0.1), cfg.train, cfg.dist, DistEnv())
    assert engine.device.type == "cuda" and engine.bf16 and engine.memory_format == torch.channels_last
    images = torch.randn(4, 3, 8, 8).to(engine.device, memory_format=engine.memory_format)
    with engine.autocast():
        out = engine.forward(images)["m"]
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_default_job_trains_on_cuda(tmp_path, digits_root, run_distq):
    proc = run_distq("train", "configs/digits_w4a4.yaml", "log.progress=false", f"run.dir={tmp_path}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["val/top1"] >= 96.0, results
    assert 0 < results["max_memory_gib"] < 10, results  # measured on CUDA only
    assert results["train_images_per_s"] > 0
