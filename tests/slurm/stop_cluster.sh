#!/usr/bin/env bash
# Stop the daemons that tests/slurm/start_cluster.sh DIR started (by their pid files).
# munged stays up: it may serve other SLURM clients of the machine and costs nothing.
set -uo pipefail

DIR=${1:?usage: stop_cluster.sh DIR}
for daemon in slurmd slurmctld; do
    pidfile="$DIR/$daemon.pid"
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
done
