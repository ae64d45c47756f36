#!/usr/bin/env bash
# A one-node Slurm cluster on this machine (slurmctld and slurmd on this host, munge for authentication), to run
# `benchmark/sweep.py --slurm` job arrays through a real scheduler: in CI, or to try a sweep before a real cluster.
#
#   benchmark/cluster/slurm_local.sh start    write the configuration, start munged, slurmctld and slurmd, wait until
#                                             the node takes jobs (idempotent: running daemons are kept)
#   benchmark/cluster/slurm_local.sh stop     stop the three daemons
#   benchmark/cluster/slurm_local.sh status   the daemons and `sinfo`; exit status 0 when the node takes jobs, 3 if not
#
# Needs root and Debian's packages: apt-get install slurmctld slurmd slurm-client munge (or slurm-wlm munge).
# The node is this host with the CPUs and memory `slurmd -C` finds; one partition `local` (the default); consumable
# CPUs (select/cons_tres, CR_CPU), so several 1-CPU array tasks run at once; no cgroups (proctrack/linuxproc,
# task/none), so it runs in containers too. The configuration goes to $SLURM_CONF (default /etc/slurm/slurm.conf,
# where sbatch and sinfo look), state, logs and pid files to $SLURM_LOCAL_DIR (default /var/lib/slurm-local).
# A slurm.conf this script did not write is never overwritten.
set -euo pipefail

CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
BASE=${SLURM_LOCAL_DIR:-/var/lib/slurm-local}
PARTITION=local
MARK="# one-node cluster written by benchmark/cluster/slurm_local.sh"
WAIT_S=${SLURM_LOCAL_WAIT_S:-90}

fail() { echo "error: $*" >&2; exit 2; }

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

node_state() { sinfo -h -N -o %T 2>/dev/null | head -1 || true; }

start_munge() {
    if munge_ok; then return; fi
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key >/dev/null
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    runuser -u munge -- munged --force
    for _ in $(seq 50); do munge_ok && return; sleep 0.2; done
    fail "munged did not start (see /var/log/munge/munged.log)"
}

write_conf() {
    local node
    # e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
    node=$(slurmd -C | head -1)
    [[ $node == NodeName=* ]] || fail "slurmd -C did not describe this node: $node"
    local name=${node%% *} memory=${node##*RealMemory=}
    name=${name#NodeName=}
    memory=${memory%% *}
    node="${node% RealMemory=*} RealMemory=$((memory * 98 / 100))"  # a little below the total: never drained for it
    mkdir -p "$(dirname "$CONF")" "$BASE/ctld" "$BASE/d"
    cat >"$CONF.new" <<EOF
$MARK
ClusterName=local
SlurmctldHost=$name(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$BASE/ctld
SlurmdSpoolDir=$BASE/d
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd.pid
SlurmctldLogFile=$BASE/slurmctld.log
SlurmdLogFile=$BASE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=10
MinJobAge=300
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$name Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f $CONF ]] && cmp -s "$CONF" "$CONF.new"; then
        rm "$CONF.new"
        return 1  # unchanged
    fi
    mv "$CONF.new" "$CONF"
}

stop_daemons() {
    scontrol shutdown >/dev/null 2>&1 || true
    for pidfile in "$BASE/slurmctld.pid" "$BASE/slurmd.pid"; do
        for _ in $(seq 50); do alive "$pidfile" || break; sleep 0.2; done
        if alive "$pidfile"; then kill "$(cat "$pidfile")" 2>/dev/null || true; sleep 1; fi
        if alive "$pidfile"; then kill -9 "$(cat "$pidfile")" 2>/dev/null || true; fi
        rm -f "$pidfile"
    done
}

start() {
    [[ $(id -u) == 0 ]] || fail "starting the daemons needs root"
    for tool in munged slurmctld slurmd sinfo sbatch scontrol; do
        command -v "$tool" >/dev/null || fail "$tool not found: apt-get install slurmctld slurmd slurm-client munge"
    done
    if [[ -f $CONF ]] && ! grep -qxF "$MARK" "$CONF"; then
        fail "$CONF was not written by this script: set SLURM_CONF to another path, or move it away"
    fi
    start_munge
    if write_conf && { alive "$BASE/slurmctld.pid" || alive "$BASE/slurmd.pid"; }; then
        stop_daemons  # a new configuration: restart with it
    fi
    export SLURM_CONF=$CONF
    alive "$BASE/slurmctld.pid" || slurmctld -f "$CONF"
    alive "$BASE/slurmd.pid" || slurmd -f "$CONF"
    local state=""
    for _ in $(seq $((WAIT_S * 2))); do
        state=$(node_state)
        case $state in
            idle | mixed | allocated | completing) break ;;
            down* | drain*) scontrol update nodename="$(sinfo -h -N -o %N | head -1)" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    case $state in
        idle | mixed | allocated | completing) ;;
        *)
            echo "error: the node is '${state:-not answering}' after ${WAIT_S} s; logs:" >&2
            tail -n 20 "$BASE/slurmctld.log" "$BASE/slurmd.log" >&2 2>/dev/null || true
            exit 1 ;;
    esac
    echo "Slurm $(sinfo -V | awk '{print $2}') one-node cluster up ($CONF):"
    sinfo -N -o "%N %P %T %c %m"
}

stop() {
    [[ $(id -u) == 0 ]] || fail "stopping the daemons needs root"
    export SLURM_CONF=$CONF
    stop_daemons
    if [[ -f /run/munge/munged.pid ]]; then
        runuser -u munge -- munged --stop >/dev/null 2>&1 || kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    fi
    echo "stopped slurmctld, slurmd and munged"
}

status() {
    export SLURM_CONF=$CONF
    local ok=0
    for daemon in slurmctld slurmd; do
        if alive "$BASE/$daemon.pid"; then
            echo "$daemon: running (pid $(cat "$BASE/$daemon.pid"))"
        else
            echo "$daemon: stopped"
            ok=3
        fi
    done
    if munge_ok; then echo "munged: running"; else echo "munged: stopped"; ok=3; fi
    local state
    state=$(node_state)
    echo "node: ${state:-no answer}"
    case $state in idle | mixed | allocated | completing) ;; *) ok=3 ;; esac
    [[ $ok == 0 ]] && sinfo -N -o "%N %P %T %c %m"
    return $ok
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "error: usage: $0 start|stop|status" >&2; exit 2 ;;
esac
