#!/usr/bin/env bash
# A real single-node SLURM cluster (slurmctld + slurmd + munge) for tests, without systemd.
#
#   localslurm.sh start  DIR   write DIR/slurm.conf, start the daemons, wait until the node is idle
#   localslurm.sh stop   DIR   cancel this cluster's jobs, stop the daemons this script started
#   localslurm.sh status DIR   exit 0 when the daemons are alive and the node answers
#
# Everything lives under DIR: slurm.conf, state, spool, logs, pid files, and DIR/pids (the PIDs
# and start times of the daemons started here; `stop` kills only those). Nothing is written to
# /etc/slurm. Client commands find the cluster only through SLURM_CONF, so run them as
#   SLURM_CONF=DIR/slurm.conf sbatch ...      (`start` prints "export SLURM_CONF=..." on stdout)
# Jobs inherit SLURM_CONF from sbatch's environment. Ports are the first free ones from 6817
# up (chosen under a machine-wide lock), so clusters in different DIRs can run side by side.
# A cluster whose `stop` never ran (e.g. pytest was SIGKILLed) keeps running: stop it with
# `localslurm.sh stop DIR` on its directory.
#
# `start` on a DIR whose cluster is alive and answering reuses it; a half-dead one is stopped
# and started afresh (state cleared with slurmctld -c). munged is shared by every cluster on
# the machine: it is started when `munge -n | unmunge` fails and is left running by `stop`.
#
# Needs root and the packages from tests/slurm/install.sh. See /work/shared/notes/local-slurm.md.
# Environment: LOCALSLURM_TIMEOUT (seconds to wait for the node, default 60).
set -euo pipefail

usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
say() { echo "localslurm: $*" >&2; }
[ $# -eq 2 ] || usage
cmd=$1
dir=$(realpath -m -- "$2")
conf=$dir/slurm.conf
pids=$dir/pids
export SLURM_CONF=$conf
export PATH=$PATH:/usr/sbin:/sbin
timeout_s=${LOCALSLURM_TIMEOUT:-60}

# Fields of /proc/PID/stat after "(comm)": [0] is the state, [19] the start time. Prints
# "STATE STARTTIME", or nothing when the process is gone.
proc_stat() {
    local stat rest
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    rest=${stat##*) }
    read -r -a f <<<"$rest"
    echo "${f[0]} ${f[19]}"
}

# True when the recorded PID is still our process: same start time, not a zombie. The init
# process here reaps late, so `kill -0` would report a dead daemon as alive.
alive() {
    local s
    s=$(proc_stat "$1")
    [ -n "$s" ] && [ "${s%% *}" != Z ] && [ "${s#* }" = "$2" ]
}

node_name() { sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$conf" 2>/dev/null | head -n1; }
node_state() { timeout 10 sinfo -h -n "$1" -o %T 2>/dev/null | head -n1 || true; }

log_tail() {
    local name
    for name in slurmctld slurmd; do
        # The .out file has what was printed before the log file was opened (bad config).
        for f in "$dir/log/$name.log" "$dir/log/$name.out"; do
            [ -s "$f" ] && { echo "--- tail of $f"; tail -n 15 "$f"; break; }
        done
    done >&2
    return 0
}

# 0 when every recorded daemon is alive; 1 when none is recorded or any is gone.
all_alive() {
    [ -s "$pids" ] || return 1
    local name pid start
    while read -r name pid start; do
        alive "$pid" "$start" || return 1
    done <"$pids"
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
    local p=$1
    while ! port_free "$p" || [ "$p" = "${2:-}" ]; do p=$((p + 1)); done
    echo "$p"
}

ensure_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    say "starting munged"
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged --force 9>&-
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    say "munged does not answer (munge -n | unmunge fails); see /var/log/munge/munged.log"
    exit 1
}

write_conf() {
    local node=$1 hw cpus mem ctld_port slurmd_port
    # slurmd -C prints this machine's NodeName line; keep its topology, under-report memory
    # a little so the node is never drained for having less than configured.
    hw=$(slurmd -C | head -n1)
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    cpus=$(grep -o 'CPUs=[0-9]* Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$hw")
    ctld_port=$(free_port 6817)
    slurmd_port=$(free_port $((ctld_port + 1)) "$ctld_port")
    cat >"$conf" <<EOF
# Written by tests/slurm/localslurm.sh; clients need SLURM_CONF=$conf
ClusterName=kdtest
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
MinJobAge=3600
KillWait=2
PlugStackConfig=$dir/plugstack.conf
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$node NodeAddr=127.0.0.1 $cpus RealMemory=$((mem * 9 / 10)) State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    : >"$dir/plugstack.conf"  # keep /etc/slurm/plugstack.conf.d out of the test cluster
}

# Start one daemon in the foreground of its own session; record its PID and start time.
launch() {
    local name=$1 pid s
    shift
    setsid "$@" </dev/null >"$dir/log/$name.out" 2>&1 9>&- &
    pid=$!
    s=$(proc_stat "$pid")
    [ -n "$s" ] || { say "$name exited at once"; log_tail; exit 1; }
    echo "$name $pid ${s#* }" >>"$pids"
}

do_stop() {
    [ -s "$pids" ] || { say "nothing recorded in $pids"; return 0; }
    local name n pid start ids
    # Cancel this cluster's jobs first, or their slurmstepd and scripts outlive slurmd.
    ids=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [ -n "${ids// /}" ]; then
        # shellcheck disable=SC2086
        timeout 10 scancel $ids 2>/dev/null || true
        for _ in $(seq 50); do
            [ -z "$(timeout 10 squeue -h -t running,completing -o %A 2>/dev/null || true)" ] && break
            sleep 0.2
        done
    fi
    # slurmd before slurmctld, TERM then KILL after 10 s; only PIDs that are still ours.
    for name in slurmd slurmctld; do
        while read -r n pid start; do
            [ "$n" = "$name" ] || continue
            alive "$pid" "$start" || continue
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 100); do alive "$pid" "$start" || break; sleep 0.1; done
            if alive "$pid" "$start"; then
                say "$name ($pid) ignored SIGTERM; sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
            fi
        done <"$pids"
    done
    rm -f "$pids"
    say "stopped cluster in $dir"
}

do_start() {
    local node state t0 waited
    if all_alive; then
        node=$(node_name)
        state=$(node_state "$node")
        case $state in
            idle|mixed|allocated|completing)
                say "reusing running cluster in $dir (node $node $state)"
                echo "export SLURM_CONF=$conf"
                return 0 ;;
        esac
    fi
    [ -s "$pids" ] && { say "restarting the cluster in $dir"; do_stop; }
    [ "$(id -u)" -eq 0 ] || { say "must run as root (SlurmUser=root, munged)"; exit 1; }
    # One start at a time on this machine, so two clusters never pick the same free ports.
    # (fd 9 is closed in the daemons, which would otherwise hold the lock.)
    exec 9>/run/lock/localslurm.lock
    flock -w 300 9 || { say "another localslurm.sh start holds /run/lock/localslurm.lock"; exit 1; }
    local c
    for c in slurmctld slurmd sinfo munged munge unmunge; do
        command -v "$c" >/dev/null || { say "$c not found: run tests/slurm/install.sh"; exit 1; }
    done
    mkdir -p "$dir"/state "$dir"/spool "$dir"/log "$dir"/run
    ensure_munge
    node=$(hostname -s)
    getent hosts "$node" >/dev/null 2>&1 || node=localhost
    write_conf "$node"
    : >"$pids"
    launch slurmctld slurmctld -D -c -f "$conf"
    launch slurmd slurmd -D -N "$node" -f "$conf"
    t0=$(date +%s%N)
    # Poll every 0.2 s until the node is idle; fail fast if a daemon dies.
    until [ "$(node_state "$node")" = idle ]; do
        waited=$((($(date +%s%N) - t0) / 1000000))
        if ! all_alive; then
            say "a daemon died during start-up (see $dir/log)"; log_tail; do_stop; exit 1
        fi
        if [ "$waited" -ge $((timeout_s * 1000)) ]; then
            say "node $node not idle after ${timeout_s}s (state: '$(node_state "$node")')"
            log_tail; do_stop; exit 1
        fi
        sleep 0.2
    done
    say "cluster up in $dir (node $node idle after $((($(date +%s%N) - t0) / 1000000)) ms)"
    echo "export SLURM_CONF=$conf"
}

do_status() {
    if [ ! -s "$pids" ]; then echo "not running (no $pids)"; return 1; fi
    local name pid start rc=0 node
    while read -r name pid start; do
        if alive "$pid" "$start"; then echo "$name $pid alive"; else echo "$name $pid gone"; rc=1; fi
    done <"$pids"
    node=$(node_name)
    echo "node $node: $(node_state "$node")"
    [ -n "$(node_state "$node")" ] || rc=1
    return $rc
}

case $cmd in
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    *) usage ;;
esac
