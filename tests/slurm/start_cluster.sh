#!/usr/bin/env bash
# Bring up a real one-node SLURM cluster on this machine, for tests/slurm/.
#
#   tests/slurm/start_cluster.sh DIR     # then: export SLURM_CONF=DIR/slurm.conf
#   tests/slurm/stop_cluster.sh DIR
#
# Installs slurm-wlm and munge with apt-get when they are missing (needs root), makes a munge
# key if there is none, writes DIR/slurm.conf for this host (proctrack/linuxproc, task/none,
# no accounting, requeue allowed, all state under DIR), starts munged, slurmctld and slurmd,
# and waits until the node is idle. The daemons' pids are in DIR/*.pid (stop_cluster.sh).
#
# Exit status: 0 the cluster is up; 77 SLURM cannot be had here (no root, no apt-get, the
# install failed): the caller should skip, with the reason printed on stderr; 1 anything else.
set -euo pipefail

DIR=${1:?usage: start_cluster.sh DIR}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
SKIP=77

say() { echo "start_cluster: $*" >&2; }

install_slurm() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
        command -v munged >/dev/null; then
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        say "slurm-wlm/munge are not installed and installing them needs root"
        exit $SKIP
    fi
    if ! command -v apt-get >/dev/null; then
        say "slurm-wlm/munge are not installed and there is no apt-get to install them"
        exit $SKIP
    fi
    say "installing slurm-wlm and munge with apt-get (a minute or two)"
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge)
    if ! "${apt[@]}" >"$DIR/apt.log" 2>&1; then
        # A fresh machine may not have package lists yet.
        if ! { apt-get update -q && "${apt[@]}"; } >>"$DIR/apt.log" 2>&1; then
            tail -20 "$DIR/apt.log" >&2
            say "apt-get install slurm-wlm munge failed (log: $DIR/apt.log)"
            exit $SKIP
        fi
    fi
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0 # a munged is already serving this machine: SLURM uses it
    fi
    local key=/etc/munge/munge.key
    if [ ! -s "$key" ]; then
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then mungekey --create --keyfile="$key" --force; else
            dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
        fi
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    if id munge >/dev/null 2>&1; then
        chown munge:munge "$key" /run/munge /var/log/munge /var/lib/munge /etc/munge
        chmod 0400 "$key"
        chmod 0755 /run/munge
        runuser -u munge -- munged
    else
        chmod 0400 "$key"
        munged --force
    fi
    for _ in $(seq 50); do
        if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    say "munged did not start"
    exit 1
}

free_port() {
    # Two ports the daemons can bind; a second cluster on the machine gets other ones.
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
    local host cpus
    host=$(hostname -s)
    cpus=$(nproc)
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$DIR/slurm.conf" <<EOF
# One-node test cluster written by tests/slurm/start_cluster.sh.
ClusterName=distqtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits out its credential's lifetime before it can start again (default 120 s).
AuthInfo=cred_expire=30
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
# Finished jobs stay visible to 'scontrol show job' for 10 minutes (there is no slurmdbd).
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmdTimeout=120
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    echo "$host" >"$DIR/node"
}

wait_idle() {
    local host state
    host=$(cat "$DIR/node")
    for _ in $(seq 300); do
        state=$(SLURM_CONF="$DIR/slurm.conf" sinfo -h -n "$host" -o %T 2>/dev/null || true)
        case "$state" in
        idle*) return 0 ;;
        down* | drain*) SLURM_CONF="$DIR/slurm.conf" scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.2
    done
    say "the node did not become idle (state: ${state:-none}); logs in $DIR/log"
    tail -5 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    exit 1
}

if [ -f "$DIR/slurm.conf" ] && [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null &&
    SLURM_CONF="$DIR/slurm.conf" sinfo -h >/dev/null 2>&1; then
    wait_idle # already up (a previous call with the same DIR)
    exit 0
fi
install_slurm
start_munge
write_conf
export SLURM_CONF="$DIR/slurm.conf"
# -c: a clean start, no jobs or node state from an earlier cluster in DIR.
slurmctld -c -f "$SLURM_CONF"
slurmd -c -f "$SLURM_CONF"
wait_idle
say "cluster up: SLURM_CONF=$SLURM_CONF"
