#!/usr/bin/env bash
#
# local-cluster.sh — a one-node Slurm cluster on this machine, for trying and
# testing scripts/slurm/*.sbatch (tests/slurm.rs runs live when it is up).
#
# USAGE (as root)
#   scripts/slurm/local-cluster.sh start [--install]   write slurm.conf, start munged,
#                                                      slurmctld and slurmd, wait for the
#                                                      node to be idle in sinfo
#   scripts/slurm/local-cluster.sh stop                stop the daemons started by start
#   scripts/slurm/local-cluster.sh status              daemons, sinfo, squeue; exit 0 if the
#                                                      node is up, 3 if not
#   scripts/slurm/local-cluster.sh conf                print the slurm.conf path
#
#   start needs the Debian/Ubuntu packages slurm-wlm and munge. It installs them
#   only with --install (apt-get install -y slurm-wlm munge); otherwise it prints
#   that command and exits 4.
#
# WHAT start DOES
#   - writes $AFPROBE_SLURM_DIR/slurm.conf: cluster "afprobe-local", one node = this
#     host (CPUs from nproc, RealMemory from /proc/meminfo and the cgroup limit),
#     one partition "local", SelectType=select/cons_tres (CR_CPU),
#     ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, no accounting,
#     daemons as root, state, spool, pid and log files under $AFPROBE_SLURM_DIR;
#   - points /etc/slurm/slurm.conf at it (a symlink) when that file is absent or
#     already ours, so sbatch/sinfo/squeue find it; if another slurm.conf is there
#     it is left alone and you must export SLURM_CONF=$AFPROBE_SLURM_DIR/slurm.conf;
#   - creates /etc/munge/munge.key if there is none and starts munged (as the
#     munge user) unless one is running;
#   - starts slurmctld and slurmd and waits up to $AFPROBE_SLURM_WAIT seconds for
#     `sinfo` to show the node idle; on failure prints the daemons' last log lines.
#   stop runs `scontrol shutdown`, stops munged if start started it, and removes
#   the /etc/slurm/slurm.conf symlink. Job state does not survive a stop.
#
# ENVIRONMENT
#   AFPROBE_SLURM_DIR    state directory (default /var/spool/afprobe-slurm)
#   AFPROBE_SLURM_WAIT   seconds to wait for the node (default 60)
set -euo pipefail

dir=${AFPROBE_SLURM_DIR:-/var/spool/afprobe-slurm}
wait_s=${AFPROBE_SLURM_WAIT:-60}
conf=$dir/slurm.conf
etc_conf=/etc/slurm/slurm.conf
install_cmd="apt-get install -y slurm-wlm munge"

say() { echo "local-cluster: $*" >&2; }
die() { # die MESSAGE [EXIT CODE]
    echo "local-cluster: error: $1" >&2
    exit "${2:-1}"
}
usage() {
    sed -n '/^# local-cluster.sh —/,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//; s/^#$//'
}
alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }
pid_in() { if [[ -s $1 ]]; then cat "$1"; fi; }

missing_tools() {
    local t missing=()
    for t in munged munge slurmctld slurmd sbatch sinfo squeue scontrol; do
        command -v "$t" >/dev/null 2>&1 || missing+=("$t")
    done
    echo "${missing[*]}"
}

install_packages() {
    say "installing: $install_cmd"
    if ! DEBIAN_FRONTEND=noninteractive $install_cmd; then
        say "install failed; refreshing the package lists (apt-get update) and trying again"
        apt-get update
        DEBIAN_FRONTEND=noninteractive $install_cmd
    fi
}

node_state() {
    # The node's state as sinfo shows it (idle, mix, alloc, down*, drain, ...), or empty.
    SLURM_CONF=$conf timeout 10 sinfo -h -N -o '%T' 2>/dev/null | head -n1 || true
}

up() {
    case $(node_state) in
    idle | mixed | mix | allocated | alloc | completing) return 0 ;;
    *) return 1 ;;
    esac
}

show_logs() {
    local f
    for f in "$dir/slurmctld.log" "$dir/slurmd.log" /var/log/munge/munged.log; do
        [[ -s $f ]] || continue
        echo "---- last lines of $f" >&2
        tail -n 25 "$f" >&2
    done
}

write_conf() {
    local host cpus mem_kb mem_mb limit
    host=$(hostname -s)
    cpus=$(nproc)
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    mem_mb=$((mem_kb / 1024))
    limit=$(cat /sys/fs/cgroup/memory.max 2>/dev/null || echo max)
    if [[ $limit =~ ^[0-9]+$ ]] && ((limit / 1048576 < mem_mb)); then
        mem_mb=$((limit / 1048576))
    fi
    # Leave some memory to the system and the daemons.
    mem_mb=$((mem_mb * 95 / 100))
    mkdir -p "$dir/ctld" "$dir/d"
    cat >"$conf" <<EOF
# Written by afprobe scripts/slurm/local-cluster.sh: a one-node Slurm for tests.
ClusterName=afprobe-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/d
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    say "wrote $conf (node $host: $cpus CPUs, ${mem_mb} MB)"
    if [[ -L $etc_conf && $(readlink "$etc_conf") == "$conf" ]]; then
        :
    elif [[ -e $etc_conf || -L $etc_conf ]]; then
        say "$etc_conf exists and is not ours; leaving it: export SLURM_CONF=$conf for sbatch, sinfo and squeue"
    else
        mkdir -p "$(dirname "$etc_conf")"
        ln -s "$conf" "$etc_conf"
        say "linked $etc_conf -> $conf"
    fi
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        say "munged is running"
        return
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key --force
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    id munge >/dev/null 2>&1 || die "there is no munge user; reinstall munge ($install_cmd)"
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    runuser -u munge -- munged ||
        {
            show_logs
            die "munged did not start (see above)"
        }
    pid_in /run/munge/munged.pid >"$dir/munged.started"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && {
            say "started munged"
            return
        }
        sleep 0.1
    done
    show_logs
    die "munged started but munge -n | unmunge fails"
}

start() {
    local install=false
    case "$#:${1:-}" in
    0:) ;;
    1:--install) install=true ;;
    *) die "start takes only --install, got: $*" 2 ;;
    esac
    [[ $(id -u) -eq 0 ]] || die "start must run as root (it writes /etc/munge and runs the daemons as root)"
    local missing
    missing=$(missing_tools)
    if [[ -n $missing ]]; then
        $install || die "missing $missing; install the packages with: $install_cmd (or run start --install)" 4
        install_packages
        missing=$(missing_tools)
        [[ -z $missing ]] || die "still missing $missing after $install_cmd"
    fi
    local t0=$SECONDS
    mkdir -p "$dir"
    if up; then
        say "already up: $(SLURM_CONF=$conf sinfo -h -N -o '%N %T %c CPUs %m MB')"
        return 0
    fi
    write_conf
    start_munge
    export SLURM_CONF=$conf
    if ! alive "$(pid_in "$dir/slurmctld.pid")"; then
        slurmctld -f "$conf" -i ||
            {
                show_logs
                die "slurmctld did not start (its log is above)"
            }
    fi
    if ! alive "$(pid_in "$dir/slurmd.pid")"; then
        slurmd -f "$conf" ||
            {
                show_logs
                die "slurmd did not start (its log is above)"
            }
    fi
    local state=
    while ((SECONDS - t0 < wait_s)); do
        state=$(node_state)
        case $state in
        idle | mixed | mix | allocated | alloc)
            say "up in $((SECONDS - t0)) s: $(sinfo -h -N -o '%N %T, %c CPUs, %m MB, partition %P')"
            return 0
            ;;
        down* | drain*)
            # A node that came back after a restart may be held down; let it in.
            scontrol update NodeName="$(hostname -s)" State=RESUME 2>/dev/null || true
            ;;
        esac
        sleep 1
    done
    say "the node is not idle after ${wait_s} s (sinfo state: '${state:-no answer}')"
    SLURM_CONF=$conf sinfo -R 2>&1 | sed 's/^/  /' >&2 || true
    show_logs
    die "Slurm did not come up; see the log lines above"
}

stop() {
    export SLURM_CONF=$conf
    local ctld d m
    ctld=$(pid_in "$dir/slurmctld.pid")
    d=$(pid_in "$dir/slurmd.pid")
    if alive "$ctld" || alive "$d"; then
        timeout 20 scontrol shutdown >/dev/null 2>&1 || true
        for _ in $(seq 100); do
            alive "$ctld" || alive "$d" || break
            sleep 0.2
        done
        for p in $ctld $d; do
            if alive "$p"; then kill "$p" 2>/dev/null || true; fi
        done
        say "stopped slurmctld and slurmd"
    else
        say "slurmctld and slurmd are not running"
    fi
    m=$(pid_in "$dir/munged.started")
    if alive "$m"; then
        kill "$m" && say "stopped munged (pid $m)"
    fi
    rm -f "$dir/munged.started"
    if [[ -L $etc_conf && $(readlink "$etc_conf") == "$conf" ]]; then
        rm -f "$etc_conf"
    fi
}

status() {
    local name pid
    for name in slurmctld slurmd; do
        pid=$(pid_in "$dir/$name.pid")
        if alive "$pid"; then echo "$name: running (pid $pid)"; else echo "$name: not running"; fi
    done
    if command -v munge >/dev/null 2>&1 && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        echo "munged: running"
    else
        echo "munged: not running"
    fi
    echo "config: $conf"
    if up; then
        SLURM_CONF=$conf sinfo
        SLURM_CONF=$conf squeue
        return 0
    fi
    echo "node: not up (sinfo state: '$(node_state)')"
    return 3
}

case ${1:-} in
start)
    shift
    start "$@"
    ;;
stop) stop ;;
status) status ;;
conf) echo "$conf" ;;
-h | --help | help) usage ;;
*)
    usage >&2
    die "expected start [--install], stop, status or conf" 2
    ;;
esac
