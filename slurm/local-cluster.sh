#!/usr/bin/env bash
# A real two-node Slurm cluster on localhost, for tests and CI. It lives entirely in a private
# directory and never touches a real Slurm installation on the machine.
#
#   slurm/local-cluster.sh install     # apt packages (recorded), private config + munge key, /etc/hosts lines (tagged)
#   slurm/local-cluster.sh start       # private munged + slurmctld + slurmd -N n1 / -N n2, wait until idle
#   slurm/local-cluster.sh status      # sinfo + squeue of this cluster; exit 1 if it is not up
#   slurm/local-cluster.sh stop        # cancel this cluster's jobs, stop the daemons it started (pidfiles only)
#   slurm/local-cluster.sh uninstall   # stop, remove the tagged /etc/hosts lines, the private directory and
#                                      # the packages that `install` added
#   eval "$(slurm/local-cluster.sh env)"   # export SLURM_CONF so that sbatch/srun/sinfo/submitit use it
#
# Both nodes (n1, n2) are this machine (127.0.0.1), each slurmd with its own port and spool.
# Everything it writes is under $GAN_BENCH_SLURM_DIR (default /var/lib/gan-bench-slurm):
#   etc/slurm.conf  munge/ (key, socket, pid, log)  run/ (pidfiles)  log/  spool/  installed-packages
# It refuses to run where a Slurm it did not create is present: an /etc/slurm/slurm.conf, or a
# slurmctld / slurmd process that its pidfiles do not name. It never edits /etc/slurm or /etc/munge
# and never signals a process its own pidfiles do not name.
#
# Environment knobs (optional):
#   GAN_BENCH_SLURM_DIR  private directory (default /var/lib/gan-bench-slurm)
#   SLURM_LOCAL_CPUS     CPUs declared per node (default 2: allows 1 node x 2 tasks)
#   SLURM_LOCAL_MEM_MB   RealMemory declared per node (default 2048)
#   SLURM_LOCAL_WAIT_S   how long `start` waits for both nodes to become idle (default 60)
#   SLURM_LOCAL_PORT     slurmctld port (default 6817); the nodes use 17001 and 17002
#   SLURM_LOCAL_SYSTEM_CONF, SLURM_LOCAL_HOSTS_FILE   where a real Slurm's config and the hosts file are
#                        (default /etc/slurm/slurm.conf, /etc/hosts; the tests point them elsewhere)
set -euo pipefail

PREFIX=${GAN_BENCH_SLURM_DIR:-/var/lib/gan-bench-slurm}
CONF_DIR=$PREFIX/etc
CONF=$CONF_DIR/slurm.conf
LOG_DIR=$PREFIX/log
RUN_DIR=$PREFIX/run
SPOOL_DIR=$PREFIX/spool
STATE_DIR=$SPOOL_DIR/ctld
MUNGE_DIR=$PREFIX/munge
MUNGE_KEY=$MUNGE_DIR/munge.key
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
MUNGE_PID=$MUNGE_DIR/munged.pid
MUNGE_LOG=$MUNGE_DIR/munged.log
MUNGE_SEED=$MUNGE_DIR/munged.seed
INSTALLED=$PREFIX/installed-packages
MARKER=$PREFIX/.gan-bench-local-cluster  # `uninstall` deletes $PREFIX only where this file says it is ours
CTLD_PID=$RUN_DIR/slurmctld.pid
CTLD_LOG=$LOG_DIR/slurmctld.log
HOSTS_TAG="# gan-bench-local-cluster"
CONF_TAG="# Written by gan-bench slurm/local-cluster.sh"
NODES=(n1 n2)
PORTS=(17001 17002)
CTLD_PORT=${SLURM_LOCAL_PORT:-6817}
CPUS=${SLURM_LOCAL_CPUS:-2}
MEM_MB=${SLURM_LOCAL_MEM_MB:-2048}
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}
PACKAGES=(munge slurmctld slurmd slurm-client)
SYSTEM_CONF=${SLURM_LOCAL_SYSTEM_CONF:-/etc/slurm/slurm.conf}
HOSTS=${SLURM_LOCAL_HOSTS_FILE:-/etc/hosts}

export SLURM_CONF=$CONF  # every Slurm command below talks to this cluster only

log() { echo "[local-cluster] $*"; }
die() { echo "[local-cluster] ERROR: $*" >&2; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (daemons, /etc/hosts)"; }

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

# live processes whose command name is exactly $1
live_pids_named() {
    ps -eo pid=,stat=,comm= | awk -v n="$1" '$3 == n && $2 !~ /^[ZX]/ {print $1}'
}

our_pids() {
    local f
    for f in "$CTLD_PID" "$RUN_DIR"/slurmd-*.pid "$MUNGE_PID"; do live_pid "$f"; done
}

# Refuse where a Slurm that this script did not create is present: a system slurm.conf it did not write
# (install and start), or a running slurmctld / slurmd that its pidfiles do not name (start).
check_no_foreign_conf() {
    if [[ -f $SYSTEM_CONF ]] && ! grep -qF "$CONF_TAG" "$SYSTEM_CONF"; then
        die "$SYSTEM_CONF exists: this machine has a real Slurm; the local test cluster will not run beside it"
    fi
}

check_no_foreign_daemons() {
    local ours prog pid foreign=()
    ours=" $(our_pids | tr '\n' ' ') "
    for prog in slurmctld slurmd; do
        for pid in $(live_pids_named "$prog"); do
            [[ $ours == *" $pid "* ]] || foreign+=("$prog (pid $pid)")
        done
    done
    ((${#foreign[@]} == 0)) || die "Slurm daemons that this script did not start are running: ${foreign[*]}; refusing to start another Slurm beside them"
}

packages_installed() {
    local p st
    for p in "${PACKAGES[@]}"; do
        st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
        [[ $st == "install ok installed" ]] || return 1
    done
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null
}

install_packages() {
    if packages_installed; then
        log "packages already installed: ${PACKAGES[*]}"
        return
    fi
    local p st missing=()
    for p in "${PACKAGES[@]}"; do
        st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
        [[ $st == "install ok installed" ]] || missing+=("$p")
    done
    log "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The packages' maintainer scripts try to start services; without systemd/init that fails harmlessly.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    packages_installed || die "apt-get finished but ${PACKAGES[*]} are not all installed"
    mkdir -p "$PREFIX"
    printf '%s\n' "${missing[@]}" >>"$INSTALLED"  # `uninstall` removes these, and only these
}

write_conf() {
    local host tmp
    host=$(hostname -s)
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
$CONF_TAG: two nodes on one host, for tests.
ClusterName=ganbenchlocal
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# The private munged's socket. cred_expire also sets how long a requeued job waits before it may
# start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
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

SlurmctldPort=$CTLD_PORT
SlurmctldPidFile=$CTLD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmdSpoolDir=$SPOOL_DIR/slurmd-%n
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
StateSaveLocation=$STATE_DIR
PlugStackConfig=$CONF_DIR/plugstack.conf
SlurmctldDebug=info
SlurmdDebug=info

# No accounting daemon: sacct does not work (submitit warns, then goes by its result files).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none

# Requeue (scontrol requeue, preemption, submitit timeouts) must work.
JobRequeue=1
ReturnToService=2

# Fast turnaround for tests. KillWait: a cancelled or requeued job gets 15 s after SIGTERM to finish its
# step and write its checkpoint before SIGKILL, even on a slow, busy machine (Slurm's default is 30 s; a
# process that ignores SIGTERM, as submitit's own job wrapper does, is killed only after it).
KillWait=15
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
    : >"$CONF_DIR/plugstack.conf"  # no SPANK plugins (the system's plugstack.conf is not ours to read)
    install -m 0644 "$tmp" "$CONF"
    rm -f "$tmp"
    log "wrote $CONF"
}

ensure_munge_key() {
    mkdir -p "$MUNGE_DIR"
    if [[ ! -s $MUNGE_KEY ]]; then
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        log "created the private munge key $MUNGE_KEY"
    fi
    chown munge:munge "$MUNGE_DIR" "$MUNGE_KEY"
    chmod 0755 "$MUNGE_DIR"
    chmod 0400 "$MUNGE_KEY"
}

# true if some line of the hosts file maps 127.0.0.1 to $1
mapped() { grep -Eq "^127\.0\.0\.1([[:space:]]+[^[:space:]#]+)*[[:space:]]+$1([[:space:]]|\$)" "$HOSTS"; }

# Lines this script adds to the hosts file end with $HOSTS_TAG; `uninstall` removes exactly those.
ensure_hosts() {
    local n host missing=()
    for n in "${NODES[@]}"; do
        mapped "$n" || missing+=("$n")  # MASTER_ADDR=n1 must be this machine
    done
    host=$(hostname -s)
    mapped "$host" || getent hosts "$host" >/dev/null || missing+=("$host")  # slurmd must resolve its host
    if ((${#missing[@]})); then
        echo "127.0.0.1 ${missing[*]} $HOSTS_TAG" >>"$HOSTS"
        log "added '127.0.0.1 ${missing[*]}' to $HOSTS (tagged)"
    fi
}

make_dirs() {
    local n
    if [[ -d $PREFIX && ! -f $MARKER && -n $(ls -A "$PREFIX" 2>/dev/null) ]]; then
        die "$PREFIX exists and was not made by this script; set GAN_BENCH_SLURM_DIR to an empty or new directory"
    fi
    mkdir -p "$PREFIX"
    echo "made by gan-bench slurm/local-cluster.sh; 'uninstall' removes this directory" >"$MARKER"
    mkdir -p "$LOG_DIR" "$RUN_DIR" "$STATE_DIR" "$MUNGE_DIR"
    for n in "${NODES[@]}"; do mkdir -p "$SPOOL_DIR/slurmd-$n"; done
    chmod 0755 "$PREFIX"
}

cmd_install() {
    need_root
    check_no_foreign_conf
    make_dirs
    install_packages
    ensure_munge_key
    ensure_hosts
    write_conf
    log "install done; use it with: export SLURM_CONF=$CONF"
}

show_log_tail() {
    local f=$1
    if [[ -f $f ]]; then
        echo "---- last lines of $f ----" >&2
        tail -n 20 "$f" >&2 || true
        echo "----" >&2
    fi
}

munge_answers() { munge -S "$MUNGE_SOCKET" -n 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }

start_munge() {
    if [[ -n $(live_pid "$MUNGE_PID") ]] && munge_answers; then
        log "private munged already running"
        return
    fi
    [[ -s $MUNGE_KEY ]] || die "no munge key at $MUNGE_KEY: run '$0 install' first"
    rm -f "$MUNGE_PID" "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    runuser -u munge -- /usr/sbin/munged --force --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" \
        --pid-file="$MUNGE_PID" --log-file="$MUNGE_LOG" --seed-file="$MUNGE_SEED" ||
        { show_log_tail "$MUNGE_LOG"; die "munged failed to start (log: $MUNGE_LOG)"; }
    local i
    for i in $(seq 50); do
        if munge_answers; then log "private munged started"; return; fi
        sleep 0.2
    done
    show_log_tail "$MUNGE_LOG"
    die "munged does not answer on $MUNGE_SOCKET (log: $MUNGE_LOG)"
}

ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

start_slurmctld() {
    if [[ -n $(live_pid "$CTLD_PID") ]] && ctld_up; then
        log "slurmctld already running"
        return
    fi
    rm -f "$CTLD_PID"
    slurmctld -f "$CONF" || { show_log_tail "$CTLD_LOG"; die "slurmctld failed to start (log: $CTLD_LOG)"; }
    local i
    for i in $(seq 100); do
        if ctld_up; then log "slurmctld started"; return; fi
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
    slurmd -f "$CONF" -N "$n" || { show_log_tail "$logf"; die "slurmd -N $n failed to start (log: $logf)"; }
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
            log "cluster up (SLURM_CONF=$CONF):"
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
    check_no_foreign_conf
    check_no_foreign_daemons
    make_dirs
    start_munge
    start_slurmctld
    local n
    for n in "${NODES[@]}"; do start_slurmd "$n"; done
    wait_idle
}

# stop_pid_files NAME PIDFILE [NAME PIDFILE ...]: SIGTERM each named pid, wait (bounded), then SIGKILL
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

# Cancel this cluster's jobs (SLURM_CONF is ours), so that no job processes outlive it: slurmd
# kills a cancelled job's steps itself.
cancel_our_jobs() {
    [[ -n $(live_pid "$CTLD_PID") ]] && ctld_up || return 0
    local jobs i
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    [[ -z $jobs ]] && return 0
    log "cancelling this cluster's jobs: $(echo $jobs)"
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
    cancel_our_jobs
    for n in "${NODES[@]}"; do args+=("slurmd $n" "$(slurmd_pid_file "$n")"); done
    stop_pid_files "${args[@]}" slurmctld "$CTLD_PID"
    stop_pid_files munged "$MUNGE_PID"
    log "stopped"
}

cmd_uninstall() {
    need_root
    cmd_stop
    if grep -qF "$HOSTS_TAG" "$HOSTS"; then
        local tmp
        tmp=$(mktemp)
        grep -vF "$HOSTS_TAG" "$HOSTS" >"$tmp" || true
        cat "$tmp" >"$HOSTS"  # rewrite in place: /etc/hosts may be a bind mount
        rm -f "$tmp"
        log "removed the tagged lines from $HOSTS"
    fi
    if [[ -f $SYSTEM_CONF ]] && grep -qF "$CONF_TAG" "$SYSTEM_CONF"; then
        rm -f "$SYSTEM_CONF"  # written by an earlier version of this script
        log "removed $SYSTEM_CONF (written by an earlier version of this script)"
    fi
    if [[ -s $INSTALLED ]]; then
        local pkgs
        mapfile -t pkgs <"$INSTALLED"
        log "removing the packages install added: ${pkgs[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq "${pkgs[@]}" >/dev/null || true
    fi
    if [[ -f $MARKER ]]; then
        rm -rf "$PREFIX"
    elif [[ -d $PREFIX ]]; then
        log "$PREFIX was not made by this script (no marker file): left as it is"
    fi
    log "uninstalled"
}

cmd_status() {
    local rc=0 n st
    command -v sinfo >/dev/null || { echo "sinfo not found: slurm is not installed" >&2; return 1; }
    if ! ctld_up; then
        echo "slurmctld is not answering (SLURM_CONF=$CONF)" >&2
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
    uninstall) cmd_uninstall ;;
    env) printf 'export SLURM_CONF=%q\n' "$CONF" ;;
    *) echo "usage: $0 install|start|stop|status|restart|uninstall|env" >&2; exit 2 ;;
esac
