"""The integer engine against the fake-quantized model of trained checkpoints, on the whole
digits val split (slow: each case trains a model, and the bit kernels are slower than float).

Tolerances (float32, the default): the same predicted class on at least 99.9% of images,
and a per-image max |logit difference| below 10% of the largest |logit|. Differences come
only from float32 rounding moving a pre-activation that sits on a quantization boundary to
the other level (one such flip moves a 2-bit activation by 1/3, and the change propagates);
in float64 both compute the same integers and the logits agree to 1e-4, checked too.
"""

from __future__ import annotations

import pytest
import torch

from distq.infer.verify import compare

TINY = ("model.width=8", "train.epochs=4", "data.batch_size=64")
RECIPES = {
    "w1a1": ("quant.w_bits=1", "quant.a_bits=1"),
    "w2a2": ("quant.w_bits=2", "quant.a_bits=2"),
    "w4a4": ("quant.w_bits=4", "quant.a_bits=4"),
    "aqe_w2a2": ("quant.w_bits=2", "quant.a_bits=2", "quant.method=aqe", "precision.aqe.end=1dur"),  # alpha ends at 1
}


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory, run_distq, tiny_args):
    """``exported_model(name, full=False)`` -> (checkpoint, export file): trained once per
    session, tiny (width 8, 4 epochs) or with the full digits recipe (configs/digits_w4a4.yaml)."""
    made = {}

    def make(name: str, full: bool = False):
        key = (name, full)
        if key not in made:
            run_dir = tmp_path_factory.mktemp(f"{name}-{'full' if full else 'tiny'}")
            if full:
                args = [
                    "train",
                    "configs/digits_w4a4.yaml",
                    "data.workers=0",
                    "log.progress=false",
                    f"run.dir={run_dir}",
                    *RECIPES[name],
                ]
            else:
                args = tiny_args(run_dir, *TINY, *RECIPES[name])
            proc = run_distq(*args, timeout=3600)
            assert proc.returncode == 0, proc.stderr
            checkpoint, out = run_dir, run_dir / "model.safetensors"
            proc = run_distq("export", checkpoint, "--out", out)
            assert proc.returncode == 0, proc.stderr
            made[key] = (str(checkpoint), str(out))
        return made[key]

    return make


def _check(report: dict) -> None:
    assert report["images"] == 355
    assert report["agree"] >= 0.999 * report["images"], report
    assert report["max_logit_gap"] <= 0.1 * report["max_abs_logit"], report


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_engine_agrees_on_tiny_trained_models(exported_model, name):
    checkpoint, export_file = exported_model(name)
    _check(compare(checkpoint, export_file))
    exact = compare(checkpoint, export_file, dtype=torch.float64)
    assert exact["agree"] == exact["images"] and exact["max_logit_gap"] <= 1e-4, exact


@pytest.mark.slow
@pytest.mark.parametrize("name", ["w1a1", "w2a2", "w4a4"])
def test_engine_agrees_on_fully_trained_models(exported_model, name):
    checkpoint, export_file = exported_model(name, full=True)
    report = compare(checkpoint, export_file)
    _check(report)
    assert report["top1_fake_quant"] > 90, report  # a properly trained model, not a degenerate one
