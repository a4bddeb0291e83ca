#!/usr/bin/env bash
# One node's part of a distq SLURM job: slurm/train.sbatch starts it once per node
# (srun --ntasks-per-node=1); it runs torchrun (or accelerate launch) over this node's
# processes and exits with 3 when distq checkpointed on SIGUSR1 and wants a requeue.
#
# Reads (see slurm/train.sbatch): DISTQ_CONFIG, DISTQ_OVERRIDES, GPUS_PER_NODE,
# CPU_PROCS_PER_NODE, LAUNCHER, ACCELERATE_CONFIG, PYTHON, and from train.sbatch
# DISTQ_MASTER_ADDR / DISTQ_MASTER_PORT; from srun SLURM_NNODES, SLURM_NODEID,
# SLURM_CPUS_PER_TASK.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
die() {
    echo "node.sh: $*" >&2
    exit 2
}
: "${DISTQ_CONFIG:?set DISTQ_CONFIG}" "${DISTQ_MASTER_ADDR:?}" "${DISTQ_MASTER_PORT:?}"
nnodes=${SLURM_NNODES:-1}
node_rank=${SLURM_NODEID:-0}

if [ -n "${CPU_PROCS_PER_NODE:-}" ]; then
    procs=$CPU_PROCS_PER_NODE
    export CUDA_VISIBLE_DEVICES="" # CPU mode: gloo, even on a GPU node
elif [ -n "${GPUS_PER_NODE:-}" ]; then
    procs=$GPUS_PER_NODE
elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    procs=$SLURM_GPUS_ON_NODE
elif command -v nvidia-smi >/dev/null && [ "$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" -gt 0 ]; then
    procs=$(nvidia-smi -L | grep -c '^GPU')
else
    die "no GPU found on $(hostname): set GPUS_PER_NODE, or CPU_PROCS_PER_NODE=N for N processes on the CPU"
fi
# Split the task's CPUs between the processes, unless the user chose.
cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / procs > 0 ? cpus / procs : 1))}

# SIGUSR1 is for the training processes (distq checkpoints and exits 3). SLURM signals every
# process of the job step, the launcher included, whose default action would be to die (and
# torchrun does not catch USR1): ignored here, torchrun inherits the ignore; distq installs its
# own handler over it.
trap '' USR1

status_dir=$(mktemp -d)
trap 'rm -rf "$status_dir"' EXIT
export DISTQ_STATUS_DIR=$status_dir
read -ra overrides <<<"${DISTQ_OVERRIDES:-}"
train=(train "$DISTQ_CONFIG" "${overrides[@]}" --resume auto)
worker=(bash "$ROOT/slurm/worker.sh")

echo "node.sh: node $node_rank/$nnodes on $(hostname): $procs processes (${LAUNCHER:-torchrun}), rendezvous $DISTQ_MASTER_ADDR:$DISTQ_MASTER_PORT" >&2
case ${LAUNCHER:-torchrun} in
torchrun)
    "$PYTHON" -m torch.distributed.run --nnodes="$nnodes" --node_rank="$node_rank" --nproc_per_node="$procs" \
        --master_addr="$DISTQ_MASTER_ADDR" --master_port="$DISTQ_MASTER_PORT" \
        --no-python "${worker[@]}" "${train[@]}"
    ;;
accelerate)
    "$PYTHON" -m accelerate.commands.launch --config_file "${ACCELERATE_CONFIG:-$ROOT/launchers/accelerate/multi_node.yaml}" \
        --num_machines "$nnodes" --machine_rank "$node_rank" --num_processes "$((nnodes * procs))" \
        --main_process_ip "$DISTQ_MASTER_ADDR" --main_process_port "$DISTQ_MASTER_PORT" \
        --no_python "${worker[@]}" "${train[@]}"
    ;;
*) die "LAUNCHER=$LAUNCHER: use torchrun or accelerate" ;;
esac
status=$?
# The launcher stops the other processes once one exits, so a rank that was still shutting
# down may have no status: one rank that checkpointed and asked for a requeue decides.
if grep -qsx 3 "$status_dir"/rank_*; then
    echo "node.sh: ${LAUNCHER:-torchrun} exited $status; distq checkpointed and asks for a requeue (status 3)" >&2
    status=3
fi
exit "$status"
