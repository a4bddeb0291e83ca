"""onnxruntime on distq's integer ONNX export (``--format onnx-int``) against onnxruntime on the
FP32 export of the same network, PyTorch float inference and distq's integer engine, on CPU.

    python benchmarks/onnx_int_inference.py [--bits 4,2] [--batches 1,32] [--threads 1,2] [--rounds 5]

For each model (ResNet-18 width 64 at 224x224 with 1000 classes, and the digits-sized ResNet-18:
width 16, 32x32, 10 classes), thread count (1, and every core) and batch (1, 32) it times, round-robin
in this process (``benchmarks/timing.py``):

- onnxruntime (CPU provider, default graph optimisation ORT_ENABLE_ALL) on the onnx-int export of
  each WkAk model (``distq.export.onnx_export.model_to_onnx(..., "onnx-int")``);
- onnxruntime on the ONNX export of the same network in full precision (``--format onnx`` of the
  model with every quantizer off: plain float Conv/Gemm, batch-norm folded);
- PyTorch float inference of that full-precision network (eval, ``torch.inference_mode``);
- the integer engine (native kernels) on the packed export of each WkAk model.

Weights are random (as ``benchmarks/int_inference.py``: batch-norm statistics like a trained
model's), so every kernel does the work it does on a trained model. Each onnx-int export is first
checked against the integer engine (same top-1 on the batch). With one thread the table reports
CPU time (steadier on a busy machine: it does not count waiting for a core), with several wall
time. Then onnxruntime's profiler splits the onnx-int run of the 224 px W4A4 model per operator.
Replaces this benchmark's section of BENCHMARKS.md unless ``--no-report``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from int_inference import Setup, cpu_model_and_flags, engine_for, full_precision, make_model  # noqa: E402
from timing import REPO_ROOT, REPORT, context_lines, time_interleaved, write_section  # noqa: E402

from distq.export.onnx_export import model_to_onnx  # noqa: E402

TITLE = "ONNX integer export (onnx-int) in onnxruntime vs the FP32 export, PyTorch and the integer engine, CPU"
OPTIMIZATION = "ORT_ENABLE_ALL"
MODELS = {"ResNet-18 w64 224px": (64, 224), "ResNet-18 w16 32px (digits)": (16, 32)}
TARGET = 2.0
"""Issue 25: onnx-int at least 2x faster than onnxruntime on the FP32 export (ResNet-18 224 px, W4A4 and W2A2)."""


def header(model, size: int) -> dict:
    classes = model.fc.out_features
    return {
        "model": {"arch": "resnet18", "num_classes": classes},
        "preprocess": {"image_size": size, "val_crop_ratio": 1.0, "mean": [0.0] * 3, "std": [1.0] * 3},
        "classes": [str(i) for i in range(classes)],
    }


def session(proto, threads: int, profile: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    return (head or "unknown") + " plus uncommitted changes"


def op_profile(proto, batch: int, size: int, threads: int, runs: int = 3) -> dict[str, float]:
    """Fractions of onnxruntime's kernel time per operator (profiler, median of ``runs`` runs per node)."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(proto, threads, str(Path(tmp) / "ort"))
        x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
        for _ in range(runs + 1):
            sess.run(None, {"images": x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_node, op_of = defaultdict(list), {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"]].append(e["dur"])
            op_of[e["name"]] = e["args"]["op_name"]
    by_op: dict[str, float] = defaultdict(float)
    for node, durations in per_node.items():
        by_op[op_of[node]] += statistics.median(durations[1:] or durations)  # the first run allocates
    total = sum(by_op.values())
    return {op: t / total for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default="4,2", help="comma-separated k of each WkAk model")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated intra-op thread counts (onnxruntime and torch)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; medians are reported")
    parser.add_argument("--models", default=",".join(MODELS), help="which of: " + ", ".join(MODELS))
    parser.add_argument("--no-report", action="store_true", help="print only; do not write BENCHMARKS.md")
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args()
    bits_list = [int(b) for b in args.bits.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    thread_counts = list(dict.fromkeys(int(t) for t in args.threads.split(",")))
    load_before = os.getloadavg()[0]

    rows, checks, profile = [], [], None
    for model_name in args.models.split(","):
        width, size = MODELS[model_name]
        models = {bits: make_model(Setup(width, size, 1), bits, "dorefa") for bits in bits_list}
        fp = full_precision(models[bits_list[0]])
        protos = {bits: model_to_onnx(m, header(m, size), "onnx-int") for bits, m in models.items()}
        fp_proto = model_to_onnx(fp, header(fp, size), "onnx")
        engines = {bits: engine_for(m, Setup(width, size, 1), "native") for bits, m in models.items()}
        for threads in thread_counts:
            torch.set_num_threads(threads)
            sessions = {bits: session(p, threads) for bits, p in protos.items()}
            fp_session = session(fp_proto, threads)
            for batch in batches:
                x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
                feed = {"images": x.numpy()}
                for bits in bits_list if threads == thread_counts[0] else ():
                    got, want = sessions[bits].run(None, feed)[0], engines[bits](x).numpy()
                    same = int((got.argmax(1) == want.argmax(1)).sum())
                    gap = np.abs(got - want).max(1)
                    checks.append(
                        f"{model_name} W{bits}A{bits} batch {batch}: onnx-int and the integer engine: same top-1 on {same}/{batch}, "
                        f"per-image max |logit diff| median {np.median(gap):.1e}, max {gap.max():.2g} (max |logit| {np.abs(want).max():.3g})"
                    )
                    print(checks[-1], flush=True)
                variants = {"ort_fp32": lambda s=fp_session, f=feed: s.run(None, f), "torch": lambda m=fp, x=x: m(x)}
                for bits in bits_list:
                    variants[f"int{bits}"] = lambda s=sessions[bits], f=feed: s.run(None, f)
                    variants[f"engine{bits}"] = lambda e=engines[bits], x=x: e(x)
                with torch.inference_mode():
                    timings = time_interleaved(variants, args.rounds, warmup=1, min_sample_s=0.2 if batch == 1 else 0.0)
                clock = "cpu" if threads == 1 else "wall"
                ms = {k: 1e3 * timings.median(k, clock) for k in variants}
                row = {"model": model_name, "threads": threads, "batch": batch, "clock": clock, "ms": ms}
                row["vs_fp32"] = {b: timings.ratio("ort_fp32", f"int{b}", clock) for b in bits_list}
                row["vs_torch"] = {b: timings.ratio("torch", f"int{b}", clock) for b in bits_list}
                row["vs_engine"] = {b: timings.ratio(f"engine{b}", f"int{b}", clock) for b in bits_list}
                rows.append(row)
                print(
                    f"{model_name}, {threads} thread(s), batch {batch} ({clock}): "
                    + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
                    + " | onnx-int speed-up over ORT FP32: "
                    + ", ".join(f"W{b}A{b} {row['vs_fp32'][b]:.2f}x" for b in bits_list),
                    flush=True,
                )
        if size == 224:
            bits = 4 if 4 in bits_list else bits_list[0]
            profile = (model_name, bits, max(batches), op_profile(protos[bits], max(batches), size, 1))
    torch.set_num_threads(thread_counts[0])

    cpu, flags = cpu_model_and_flags()
    vnni = "avx512_vnni" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    lines = [
        *context_lines("python benchmarks/onnx_int_inference.py" + ("" if sys.argv[1:] == [] else " " + " ".join(sys.argv[1:])), None, load_before),
        f"- CPU: {cpu} ({'AVX512-VNNI' if vnni else 'no AVX512-VNNI'}); commit {commit()}; onnxruntime {ort.__version__} (CPU execution provider, "
        f"graph optimisation {OPTIMIZATION}, 1 inter-op thread), numpy {np.__version__}.",
        "- What: ResNet-18 with random weights (batch-norm statistics like a trained model's, as benchmarks/int_inference.py), DoReFa "
        "quantizers. `onnx-int`: onnxruntime on the `--format onnx-int` export of the WkAk model; `ORT FP32`: onnxruntime on the "
        "`--format onnx` export of the same network in full precision; `PyTorch`: that network in PyTorch (eval, inference_mode); "
        "`engine`: distq's integer engine (native kernels) on the packed export. All timed round-robin in one process, medians of "
        f"{args.rounds} rounds; 1 thread: CPU time of the process, {max(thread_counts)} threads: wall time. Speed-ups are medians of "
        "per-round time ratios (higher: onnx-int faster).",
        "",
        "| model | threads | batch | ORT FP32 ms | PyTorch ms | "
        + " | ".join(f"onnx-int W{b}A{b} ms | engine W{b}A{b} ms" for b in bits_list)
        + " | "
        + " | ".join(f"W{b}A{b} / ORT FP32" for b in bits_list)
        + " | "
        + " | ".join(f"W{b}A{b} / PyTorch | W{b}A{b} / engine" for b in bits_list)
        + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * (4 * len(bits_list) + len(bits_list)),
    ]
    for r in rows:
        ms = r["ms"]
        cells = [r["model"], str(r["threads"]), str(r["batch"]), f"{ms['ort_fp32']:.1f}", f"{ms['torch']:.1f}"]
        for b in bits_list:
            cells += [f"{ms[f'int{b}']:.1f}", f"{ms[f'engine{b}']:.1f}"]
        for b in bits_list:
            mark = " ✓" if r["model"].startswith("ResNet-18 w64") and r["vs_fp32"][b] >= TARGET else ""
            cells.append(f"**{r['vs_fp32'][b]:.2f}x**{mark}")
        for b in bits_list:
            cells += [f"{r['vs_torch'][b]:.2f}x", f"{r['vs_engine'][b]:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Target (issue 25): onnx-int >= {TARGET:.0f}x ORT FP32 for ResNet-18 224 px at W4A4 and W2A2, batch 1 and 32, same thread count (✓: met).", ""]
    lines += [f"- {c}" for c in checks]
    lines += [
        "",
        "The engine computes each layer's affine in float64, onnx-int in float32 (and QuantizeLinear divides by the scale where",
        "the engine multiplies by L): a pre-activation within float32 rounding of a quantization boundary takes the other",
        "level there, and the change propagates. ResNet-18 at 224 px quantizes about 1.7 million activations per image and a",
        "random 1000-class network's top logits are nearly tied, so some images change top-1 while the median image's logits",
        "agree to float rounding; trained digits models agree on 355/355 (tests/export/test_onnx_int.py).",
    ]
    if profile:
        name, bits, batch, shares = profile
        listed = ", ".join(f"{op} {100 * share:.1f}%" for op, share in shares.items() if share >= 0.005)
        lines += ["", f"Where onnx-int's time goes ({name}, W{bits}A{bits}, batch {batch}, 1 thread; onnxruntime profiler, kernel time per operator): {listed}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_report:
        print(f"wrote {write_section(TITLE, text, args.report)}")


if __name__ == "__main__":
    main()
