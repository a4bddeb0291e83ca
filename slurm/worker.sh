#!/usr/bin/env bash
# One training process, as started by torchrun / accelerate launch in slurm/node.sh: runs
# `python -m distq ARGS` and leaves its exit status in $DISTQ_STATUS_DIR/rank_$RANK.
#
# Why: the launchers report any failed worker as their own status 1, but the requeue decision
# needs distq's status (3 = checkpointed on SIGUSR1, requeue me). node.sh reads these files.
"${PYTHON:-python}" -m distq "$@"
status=$?
if [ -n "${DISTQ_STATUS_DIR:-}" ]; then
    echo "$status" >"$DISTQ_STATUS_DIR/rank_${RANK:-0}"
fi
exit "$status"
