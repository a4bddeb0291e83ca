#!/usr/bin/env bash
# One training process: started by torchrun / accelerate launch in slurm/node.sh, or directly
# by srun (one SLURM task per process, LAUNCHER=srun in slurm/train.sbatch). Runs
# `python -m distq ARGS` and leaves its exit status in $DISTQ_STATUS_DIR/rank_$RANK.
#
# Why: the launchers report any failed worker as their own status 1, but the requeue decision
# needs distq's status (3 = checkpointed on SIGUSR1, requeue me). node.sh reads these files.
if [ -z "${RANK:-}" ] && [ -n "${SLURM_PROCID:-}" ]; then
    # Started by srun: the rank is the task's. SLURM signals every process of the step: this
    # shell ignores SIGUSR1 (distq, its child, installs its own handler and checkpoints). A task
    # that sees one GPU (--gpus-per-task=1) has it as its device 0.
    trap '' USR1
    export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS
    export MASTER_ADDR=${DISTQ_MASTER_ADDR:?} MASTER_PORT=${DISTQ_MASTER_PORT:?}
    visible=${CUDA_VISIBLE_DEVICES:-}
    if [ -n "$visible" ] && [ "${visible//,/}" = "$visible" ]; then
        export LOCAL_RANK=0
    else
        export LOCAL_RANK=${SLURM_LOCALID:-0}
    fi
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
fi
"${PYTHON:-python}" -m distq "$@"
status=$?
if [ -n "${DISTQ_STATUS_DIR:-}" ]; then
    echo "$status" >"$DISTQ_STATUS_DIR/rank_${RANK:-0}"
fi
exit "$status"
