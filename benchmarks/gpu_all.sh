#!/usr/bin/env bash
# Every GPU measurement and check of distq, in one command, on one GPU machine:
#
#     bash benchmarks/gpu_all.sh
#
# 1. ResNet-50 training throughput, synthetic batch (benchmarks/gpu_throughput.py): FP, W4A4,
#    W2A2, W1A1 and guided with the fused Triton quantizers, eager and compiled (train.compile);
# 2. JPEGS generated photo-like JPEGs (written once under the distq cache);
# 3. a short ResNet-50 W4A4 guided run through DeepSpeed + NCCL, bf16 autocast (distq train,
#    2 epochs over the JPEGs): its epoch lines and results.json give images/s and peak memory;
# 4. the throughput benchmark again, fed by the torchvision loader over those JPEGs;
# 5. the GPU tests (pytest -m gpu), and the standalone reproduction of the compiled activation
#    quantizer's zero gradient (tests/gpu/compiled_act_quant_repro.py: which pattern fails).
# Each step has a time limit; a failed step is reported and the next one runs. The two
# throughput runs replace their sections of REPORT (default BENCHMARKS.md); logs go to LOG.
# Environment: NGPUS (default: every visible GPU), JPEGS (5000), WORKERS (loader processes,
# default: CPU cores - 4), LOG (runs/gpu_all), RUN_DIR (LOG/guided_run), REPORT, PYTHON (python3).
set -u -o pipefail
PY=${PYTHON:-python3}
LOG=${LOG:-runs/gpu_all}
RUN_DIR=${RUN_DIR:-$LOG/guided_run}
REPORT=${REPORT:-BENCHMARKS.md}
JPEGS=${JPEGS:-5000}
WORKERS=${WORKERS:-$(( $(nproc) > 6 ? $(nproc) - 4 : 2 ))}
NGPUS=${NGPUS:-$($PY -c 'import torch; print(torch.cuda.device_count())')}
mkdir -p "$LOG"
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to LOG/NAME.log
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" > "$LOG/$name.log" 2>&1
    rc=$?
    grep -v -e '^\[20' -e '^W[0-9]' "$LOG/$name.log" | tail -n 15
    echo "== $name: exit $rc after $(( SECONDS - start )) s"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

if [ "$NGPUS" -lt 1 ]; then
    echo "gpu_all.sh needs a CUDA GPU, and none is visible (torch.cuda.device_count() is 0)." >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG/gpu.txt"

step throughput_synthetic 300 $PY benchmarks/gpu_throughput.py --report="$REPORT"
step throughput_compiled 420 $PY benchmarks/gpu_throughput.py --compile --no-report
step jpegs 180 $PY -c "import sys; sys.path.insert(0, 'benchmarks'); from data_loading import ensure_dataset; print(ensure_dataset($JPEGS))"
ROOT=$(tail -n 1 "$LOG/jpegs.log")
step guided_run 300 $PY -m torch.distributed.run --standalone --nproc_per_node="$NGPUS" -m distq train \
    configs/imagenet_resnet50_w4a4_guided.yaml dist.engine=deepspeed data.loader=torchvision "data.root=$ROOT" \
    "data.workers=$WORKERS" train.epochs=2 "train.milestones=[1]" log.progress=false "run.dir=$RUN_DIR"
cp "$RUN_DIR/results.json" "$LOG/guided_results.json" 2>/dev/null
step throughput_loader 240 $PY benchmarks/gpu_throughput.py --variants FP,W4A4 --jpegs "$JPEGS" --workers "$WORKERS" --report="$REPORT"
step gpu_tests 300 $PY -m pytest -q -m gpu -p no:cacheprovider tests/quant/test_quant_reference.py tests/quant/test_triton_kernels.py tests/gpu
step compiled_repro 120 $PY tests/gpu/compiled_act_quant_repro.py

if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_all.sh: failed: ${failed[*]} (logs in $LOG)" >&2
    exit 1
fi
echo "gpu_all.sh: all steps passed (logs in $LOG)"
