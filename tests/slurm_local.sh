#!/usr/bin/env bash
# A single-node SLURM on this host, for tests and for trying `livt compare --launcher slurm`.
#   tests/slurm_local.sh start    # installs slurm-wlm + munge if missing (root, apt-get), starts the daemons,
#                                 # waits until `sinfo` shows the node idle (idempotent: a running one is kept)
#   tests/slurm_local.sh status   # sinfo
#   tests/slurm_local.sh stop     # cancels its jobs, stops the daemons, removes its state
# No systemd: munged, slurmctld and slurmd run directly. 2 CPUs, no GPUs, no cgroups, no accounting;
# JobRequeue=1 so pre-empted jobs are requeued. State under $LIVT_SLURM_STATE (default /tmp/livt-slurm).
set -euo pipefail
STATE=${LIVT_SLURM_STATE:-/tmp/livt-slurm}
NODE=$(hostname -s)
CONF=/etc/slurm/slurm.conf

die() { echo "slurm_local: $*" >&2; exit 1; }

install() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return
    [ "$(id -u)" = 0 ] || die "slurm-wlm / munge are not installed and this is not root (apt-get needs root)"
    command -v apt-get >/dev/null || die "slurm-wlm / munge are not installed and there is no apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge \
             >/dev/null; } || die "apt-get install slurm-wlm munge failed"
}

write_conf() {
    mkdir -p "$STATE"/ctld "$STATE"/d /etc/slurm
    cat > "$CONF" <<CONF
ClusterName=livt
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
MinJobAge=600
SchedulerParameters=bf_interval=1,sched_interval=1
NodeName=$NODE CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
}

start_munge() {
    pgrep -x munged >/dev/null && return
    mkdir -p /etc/munge /var/run/munge /var/lib/munge /var/log/munge
    [ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    chown -R munge:munge /etc/munge /var/run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    if id munge >/dev/null 2>&1; then runuser -u munge -- munged; else munged --force; fi
}

idle() { sinfo -h -n "$NODE" -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; }

start() {
    if idle; then echo "slurm_local: already up"; sinfo; return; fi
    install
    write_conf
    start_munge
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 60); do
        idle && { sinfo; return; }
        sleep 0.5
    done
    scontrol update nodename="$NODE" state=resume 2>/dev/null || true
    for _ in $(seq 20); do idle && { sinfo; return; }; sleep 0.5; done
    die "the node did not become idle; see $STATE/slurmctld.log and $STATE/slurmd.log"
}

stop() {  # cancels what is queued, stops the daemons (waiting for them to exit) and forgets the cluster's state
    scancel --user="$(id -un)" 2>/dev/null || true
    for d in slurmd slurmctld; do
        [ -f "$STATE/$d.pid" ] && kill "$(cat "$STATE/$d.pid")" 2>/dev/null || true
    done
    for _ in $(seq 40); do
        pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break
        sleep 0.5
    done
    pkill -9 -x slurmd 2>/dev/null || true
    pkill -9 -x slurmctld 2>/dev/null || true
    pkill -9 -x slurmstepd 2>/dev/null || true
    rm -rf "$STATE"
    echo "slurm_local: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) die "usage: $0 start|stop|status" ;;
esac
