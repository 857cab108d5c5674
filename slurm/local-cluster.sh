#!/usr/bin/env bash
# A real two-node Slurm cluster on localhost, for tests and CI.
#
#   slurm/local-cluster.sh install   # apt packages, /etc/slurm/slurm.conf, munge key, /etc/hosts
#   slurm/local-cluster.sh start     # munged + slurmctld + slurmd -N n1 / -N n2, wait until idle
#   slurm/local-cluster.sh status    # sinfo + squeue; exit 1 if the cluster is not up
#   slurm/local-cluster.sh stop      # stop all daemons (idempotent)
#
# Both nodes (n1, n2) are this machine (127.0.0.1), each slurmd with its own port and spool.
# Needs root and no systemd: the daemons are started directly.
#
# Environment knobs (optional):
#   SLURM_LOCAL_CPUS     CPUs declared per node (default 2: allows 1 node x 2 tasks)
#   SLURM_LOCAL_MEM_MB   RealMemory declared per node (default 2048)
#   SLURM_LOCAL_WAIT_S   how long `start` waits for both nodes to become idle (default 60)
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm-local
RUN_DIR=/run/slurm-local
SPOOL_DIR=/var/spool/slurm-local
STATE_DIR=$SPOOL_DIR/ctld
NODES=(n1 n2)
PORTS=(17001 17002)
CPUS=${SLURM_LOCAL_CPUS:-2}
MEM_MB=${SLURM_LOCAL_MEM_MB:-2048}
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}
PACKAGES=(munge slurmctld slurmd slurm-client)
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
MUNGE_PID=$MUNGE_RUN/munged.pid
MUNGE_LOG=/var/log/munge/munged.log
CTLD_PID=$RUN_DIR/slurmctld.pid
CTLD_LOG=$LOG_DIR/slurmctld.log

log() { echo "[local-cluster] $*"; }
die() { echo "[local-cluster] ERROR: $*" >&2; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (daemons, /etc/slurm, /etc/hosts)"; }

slurmd_pid_file() { echo "$RUN_DIR/slurmd-$1.pid"; }
slurmd_log_file() { echo "$LOG_DIR/slurmd-$1.log"; }

# true if pid is a live process (zombies do not count: PID 1 here may never reap them)
pid_alive() {
    local st
    kill -0 "$1" 2>/dev/null || return 1
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)
    [[ -n $st && $st != Z && $st != X ]]
}

# pid from a pid file if that process is alive, else empty
live_pid() {
    local f=$1 pid
    [[ -s $f ]] || return 0
    pid=$(tr -dc '0-9' <"$f")
    if [[ -n $pid ]] && pid_alive "$pid"; then echo "$pid"; fi
}

# live (non-zombie) processes whose command name is exactly $1
live_pids_named() {
    ps -eo pid=,stat=,comm= | awk -v n="$1" '$3 == n && $2 !~ /^[ZX]/ {print $1}'
}

packages_installed() {
    local p st
    for p in "${PACKAGES[@]}"; do
        st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
        [[ $st == "install ok installed" ]] || return 1
    done
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null
}

write_conf() {
    local host tmp
    host=$(hostname -s)
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Written by gan-bench slurm/local-cluster.sh: two nodes on one host, for tests.
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=10
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true

# No cgroups: plain process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Re-evaluate pending jobs every few seconds (defaults: main loop 60 s, backfill 30 s).
SchedulerParameters=bf_interval=2,sched_interval=5
# Trust the node definitions below instead of the probed hardware (both slurmd share the cores).
SlurmdParameters=config_overrides

SlurmctldPort=6817
SlurmctldPidFile=$CTLD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmdSpoolDir=$SPOOL_DIR/slurmd-%n
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
StateSaveLocation=$STATE_DIR
SlurmctldDebug=info
SlurmdDebug=info

# No accounting daemon: sacct does not work (submitit warns, then goes by its result files).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none

# Requeue (scontrol requeue, preemption, submitit timeouts) must work.
JobRequeue=1
ReturnToService=2

# Fast turnaround for tests.
KillWait=5
MinJobAge=60
InactiveLimit=0
Waittime=0
SlurmdTimeout=60
SlurmctldTimeout=30
MessageTimeout=10
BatchStartTimeout=20

NodeName=${NODES[0]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${PORTS[0]} CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
NodeName=${NODES[1]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${PORTS[1]} CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP
EOF
    mkdir -p "$CONF_DIR"
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        log "$CONF unchanged"
    else
        install -m 0644 "$tmp" "$CONF"
        rm -f "$tmp"
        log "wrote $CONF (run '$0 stop; $0 start' if the cluster was running)"
    fi
}

ensure_munge_key() {
    mkdir -p /etc/munge
    if [[ ! -s $MUNGE_KEY ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
        log "created $MUNGE_KEY"
    fi
    chown munge:munge /etc/munge "$MUNGE_KEY"
    chmod 0700 /etc/munge
    chmod 0400 "$MUNGE_KEY"
}

ensure_hosts() {
    local n missing=()
    for n in "${NODES[@]}"; do
        # a name counts as present if some line maps 127.0.0.1 to it
        grep -Eq "^127\.0\.0\.1([[:space:]]+[^[:space:]]+)*[[:space:]]+$n([[:space:]]|\$)" /etc/hosts || missing+=("$n")
    done
    if ((${#missing[@]})); then
        echo "127.0.0.1 ${missing[*]}" >>/etc/hosts
        log "added '127.0.0.1 ${missing[*]}' to /etc/hosts"
    fi
    getent hosts "$(hostname -s)" >/dev/null || {
        echo "127.0.0.1 $(hostname -s)" >>/etc/hosts
        log "added '127.0.0.1 $(hostname -s)' to /etc/hosts"
    }
}

make_dirs() {
    local n
    mkdir -p "$LOG_DIR" "$RUN_DIR" "$STATE_DIR"
    for n in "${NODES[@]}"; do mkdir -p "$SPOOL_DIR/slurmd-$n"; done
    mkdir -p "$MUNGE_RUN" /var/log/munge /var/lib/munge
    chown munge:munge "$MUNGE_RUN" /var/log/munge /var/lib/munge
    chmod 0755 "$MUNGE_RUN"
    chmod 0700 /var/log/munge /var/lib/munge
}

cmd_install() {
    need_root
    if packages_installed; then
        log "packages already installed: ${PACKAGES[*]}"
    else
        log "installing ${PACKAGES[*]} (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # The packages' maintainer scripts try to start services; without systemd/init that
        # fails harmlessly (policy-rc.d denies it where present).
        apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
        packages_installed || die "apt-get finished but ${PACKAGES[*]} are not all installed"
    fi
    ensure_munge_key
    ensure_hosts
    make_dirs
    write_conf
    log "install done"
}

show_log_tail() {
    local f=$1
    if [[ -f $f ]]; then
        echo "---- last lines of $f ----" >&2
        tail -n 20 "$f" >&2 || true
        echo "----" >&2
    fi
}

start_munge() {
    # any answering munged will do (also one started by someone else)
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munged already running"
        return
    fi
    [[ -s $MUNGE_KEY ]] || die "no munge key at $MUNGE_KEY: run '$0 install' first"
    rm -f "$MUNGE_PID" "$MUNGE_RUN/munge.socket.2" "$MUNGE_RUN/munge.socket.2.lock"
    runuser -u munge -- /usr/sbin/munged --force ||
        { show_log_tail "$MUNGE_LOG"; die "munged failed to start (log: $MUNGE_LOG)"; }
    local i
    for i in $(seq 50); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then log "munged started"; return; fi
        sleep 0.2
    done
    show_log_tail "$MUNGE_LOG"
    die "munged does not answer (log: $MUNGE_LOG)"
}

start_slurmctld() {
    if [[ -n $(live_pid "$CTLD_PID") ]] || scontrol ping 2>/dev/null | grep -q 'is UP'; then
        log "slurmctld already running"
        return
    fi
    rm -f "$CTLD_PID"
    slurmctld || { show_log_tail "$CTLD_LOG"; die "slurmctld failed to start (log: $CTLD_LOG)"; }
    local i
    for i in $(seq 100); do
        if scontrol ping 2>/dev/null | grep -q 'is UP'; then log "slurmctld started"; return; fi
        if ((i > 5)) && [[ -z $(live_pid "$CTLD_PID") ]]; then break; fi
        sleep 0.2
    done
    show_log_tail "$CTLD_LOG"
    die "slurmctld is not answering (log: $CTLD_LOG)"
}

start_slurmd() {
    local n=$1 pidf logf i
    pidf=$(slurmd_pid_file "$n")
    logf=$(slurmd_log_file "$n")
    if [[ -n $(live_pid "$pidf") ]]; then
        log "slurmd $n already running"
        return
    fi
    rm -f "$pidf"
    slurmd -N "$n" || { show_log_tail "$logf"; die "slurmd -N $n failed to start (log: $logf)"; }
    for i in $(seq 50); do
        [[ -n $(live_pid "$pidf") ]] && { log "slurmd $n started"; return; }
        sleep 0.2
    done
    show_log_tail "$logf"
    die "slurmd -N $n did not stay up (log: $logf)"
}

# "n1 idle" lines for our nodes
node_states() { sinfo -h -N -p debug -o '%N %t' 2>/dev/null | sort -u; }

wait_idle() {
    local deadline=$((SECONDS + WAIT_S)) states n st ok resumed=0
    while :; do
        states=$(node_states || true)
        ok=1
        for n in "${NODES[@]}"; do
            st=$(awk -v n="$n" '$1 == n {print $2}' <<<"$states")
            case $st in
                idle | mix | alloc | comp) ;;
                down | drain | drng | drain\* | down\* | fail | failg)
                    ok=0
                    # a node left down/drained by an earlier run: bring it back once per call
                    if ((resumed < 3)); then
                        scontrol update nodename="$n" state=resume 2>/dev/null || true
                        resumed=$((resumed + 1))
                    fi
                    ;;
                *) ok=0 ;;
            esac
        done
        if ((ok)); then
            log "cluster up:"
            sinfo -N -p debug
            return 0
        fi
        if ((SECONDS >= deadline)); then
            echo "[local-cluster] ERROR: nodes not idle after ${WAIT_S}s:" >&2
            sinfo -N -p debug -o '%N %t %E' >&2 || true
            for n in "${NODES[@]}"; do show_log_tail "$(slurmd_log_file "$n")"; done
            show_log_tail "$CTLD_LOG"
            die "cluster did not come up (logs: $LOG_DIR)"
        fi
        sleep 0.5
    done
}

cmd_start() {
    need_root
    [[ -f $CONF ]] || die "$CONF missing: run '$0 install' first"
    command -v slurmctld >/dev/null || die "slurm not installed: run '$0 install' first"
    make_dirs
    start_munge
    start_slurmctld
    local n
    for n in "${NODES[@]}"; do start_slurmd "$n"; done
    wait_idle
}

# stop_pid_files NAME PIDFILE [NAME PIDFILE ...]: SIGTERM all, wait (bounded), then SIGKILL
stop_pid_files() {
    local names=() pids=() files=() pid i j alive
    while (($#)); do
        pid=$(live_pid "$2")
        if [[ -n $pid ]]; then
            names+=("$1") pids+=("$pid")
            kill "$pid" 2>/dev/null || true
        fi
        files+=("$2")
        shift 2
    done
    for i in $(seq 75); do
        alive=0
        for pid in "${pids[@]}"; do pid_alive "$pid" && alive=1; done
        ((alive)) || break
        sleep 0.2
    done
    for j in "${!pids[@]}"; do
        if pid_alive "${pids[$j]}"; then
            log "${names[$j]} (pid ${pids[$j]}) ignored SIGTERM; sending SIGKILL"
            kill -9 "${pids[$j]}" 2>/dev/null || true
        fi
        log "stopped ${names[$j]} (pid ${pids[$j]})"
    done
    rm -f "${files[@]}"
}

# Daemons that lost their pid file: match the exact program name only.
stop_strays() {
    local prog=$1 pids
    pids=$(live_pids_named "$prog")
    [[ -z $pids ]] && return 0
    log "stopping stray $prog: $pids"
    # shellcheck disable=SC2086
    kill $pids 2>/dev/null || true
    sleep 1
    pids=$(live_pids_named "$prog")
    # shellcheck disable=SC2086
    [[ -n $pids ]] && kill -9 $pids 2>/dev/null || true
}

# Cancel every job so that no job processes outlive the cluster (slurmd leaves them running).
cancel_all_jobs() {
    scontrol ping 2>/dev/null | grep -q 'is UP' || return 0
    local jobs i
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    [[ -z $jobs ]] && return 0
    log "cancelling jobs: $(echo $jobs)"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for i in $(seq 60); do
        [[ -z $(squeue -h -t all -o '%A %t' 2>/dev/null | awk '$2 != "CA" && $2 != "CD" && $2 != "F"') ]] && return 0
        sleep 0.5
    done
    log "jobs still listed after 30 s; stopping anyway"
}

cmd_stop() {
    need_root
    local n args=()
    cancel_all_jobs
    for n in "${NODES[@]}"; do args+=("slurmd $n" "$(slurmd_pid_file "$n")"); done
    stop_pid_files "${args[@]}" slurmctld "$CTLD_PID"
    stop_strays slurmd
    stop_strays slurmctld
    stop_strays slurmstepd
    stop_pid_files munged "$MUNGE_PID"
    stop_strays munged
    log "stopped"
}

cmd_status() {
    local rc=0 n st
    command -v sinfo >/dev/null || { echo "sinfo not found: slurm is not installed" >&2; return 1; }
    if ! scontrol ping 2>/dev/null | grep -q 'is UP'; then
        echo "slurmctld is not answering" >&2
        return 1
    fi
    sinfo -N -p debug || rc=1
    echo
    squeue || rc=1
    local states
    states=$(node_states || true)
    for n in "${NODES[@]}"; do
        st=$(awk -v n="$n" '$1 == n {print $2}' <<<"$states")
        case $st in
            idle | mix | alloc | comp) ;;
            *) echo "node $n is '${st:-missing}'" >&2; rc=1 ;;
        esac
    done
    return $rc
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    restart) cmd_stop; cmd_start ;;
    *) echo "usage: $0 install|start|stop|status|restart" >&2; exit 2 ;;
esac
