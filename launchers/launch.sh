#!/usr/bin/env bash
# Start `distq train` in several processes with `accelerate launch`.
#
#   launchers/launch.sh ACCELERATE_CONFIG DISTQ_CONFIG [KEY=VALUE ...] [--resume auto]
#
# is exactly
#
#   accelerate launch --config_file ACCELERATE_CONFIG [options from the env vars below] \
#       -m distq train DISTQ_CONFIG [KEY=VALUE ...] [--resume auto]
#
# Everything after DISTQ_CONFIG goes to `distq train` unchanged. Options of accelerate launch
# that differ per machine or per run come from environment variables (unset: the config
# file's value):
#   NUM_MACHINES       --num_machines       machines taking part
#   NUM_PROCESSES      --num_processes      processes of ALL machines together
#   MACHINE_RANK       --machine_rank       this machine's rank (0 on the main machine)
#   MAIN_PROCESS_IP    --main_process_ip    address of machine 0, reachable by all machines
#   MAIN_PROCESS_PORT  --main_process_port  free TCP port on machine 0 (0: any free port,
#                                           single machine only)
#   ACCELERATE_ARGS    more accelerate launch options, split on spaces
#                      (e.g. "--max_restarts 0 --monitor_interval 1")
# A config with `use_cpu: true` also hides the GPUs (CUDA_VISIBLE_DEVICES=""): distq then
# runs on the CPU over gloo. Set OMP_NUM_THREADS to the cores per process.
set -euo pipefail

usage() {
    sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
[ $# -ge 2 ] || usage
accelerate_config=$1
distq_config=$2
shift 2
[ -f "$accelerate_config" ] || { echo "launch.sh: no accelerate config file '$accelerate_config'" >&2; exit 2; }
[ -f "$distq_config" ] || { echo "launch.sh: no distq config file '$distq_config'" >&2; exit 2; }

options=(--config_file "$accelerate_config")
[ -n "${NUM_MACHINES:-}" ] && options+=(--num_machines "$NUM_MACHINES")
[ -n "${NUM_PROCESSES:-}" ] && options+=(--num_processes "$NUM_PROCESSES")
[ -n "${MACHINE_RANK:-}" ] && options+=(--machine_rank "$MACHINE_RANK")
[ -n "${MAIN_PROCESS_IP:-}" ] && options+=(--main_process_ip "$MAIN_PROCESS_IP")
[ -n "${MAIN_PROCESS_PORT:-}" ] && options+=(--main_process_port "$MAIN_PROCESS_PORT")
read -ra extra <<<"${ACCELERATE_ARGS:-}"

if grep -Eq '^use_cpu:[[:space:]]*true' "$accelerate_config"; then
    export CUDA_VISIBLE_DEVICES=""
fi
exec accelerate launch "${options[@]}" "${extra[@]}" -m distq train "$distq_config" "$@"
