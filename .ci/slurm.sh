#!/usr/bin/env bash
# A real single-node Slurm cluster (Debian 12's Slurm 22.05) for the tests.
#
#   .ci/slurm.sh install       apt-get the packages when missing (root)
#   .ci/slurm.sh start DIR     config, state, logs, pids all under DIR; start
#                              munged, mariadbd, slurmdbd, slurmctld, slurmd;
#                              wait until the node is idle and accounting
#                              works; print `export SLURM_CONF=...`
#   .ci/slurm.sh stop DIR      cancel the jobs, stop every daemon started by
#                              `start DIR` by its recorded pid (TERM, then KILL)
#
# DIR must be reachable by the slurm and munge users (every folder above it
# searchable by others, as /tmp is; pytest's basetemp is not). Nothing is
# written outside DIR: no /etc, /run or /var file is used or changed (the
# packages' own /etc/munge/munge.key is not read either; DIR gets a new key).
# On failure the last line on stderr is `slurm.sh: <what> failed: <last log
# line>`, which tests/slurm_cluster.py shows as its skip reason.
# SLURM_SH_KEEP=1 (debugging): on a failed start, leave the daemons running.
# See docs/slurm-testing.md.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurmdbd slurm-client munge mariadb-server)
COMMANDS=(slurmctld slurmd slurmdbd sinfo sbatch sacct sacctmgr munged mungekey mariadbd mariadb-install-db mariadb mariadb-admin)
# The daemons, in start order (stop goes the other way).
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
CLUSTER=eicl

die() { echo "slurm.sh: $*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

have_all() {
    local c
    for c in "${COMMANDS[@]}"; do command -v "$c" >/dev/null 2>&1 || return 1; done
}

cmd_install() {
    if have_all; then echo "slurm.sh: packages already installed"; return 0; fi
    [ "$(id -u)" = 0 ] || die "install failed: not root (apt-get needs root)"
    command -v apt-get >/dev/null || die "install failed: no apt-get on this machine"
    local t0 made_policy=""
    t0=$(now)
    # Keep the packages' init scripts from starting daemons with /etc configs.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local log rc=0
    log=$(mktemp)
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"$log" 2>&1; then
        { apt-get update -q && apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"; } >>"$log" 2>&1 || rc=$?
    fi
    [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
    if [ "$rc" != 0 ]; then
        tail -n 5 "$log" >&2
        die "install failed: apt-get: $(grep -E '^E:' "$log" | tail -n 1)"
    fi
    rm -f "$log"
    have_all || die "install failed: commands still missing after apt-get"
    echo "slurm.sh: installed in $(elapsed "$t0") s"
}

# ---------------------------------------------------------------- helpers

# alive PID: the process exists and is not a zombie.
alive() {
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [ -n "$st" ] && [[ "$st" != Z* ]]
}

last_log_line() {
    local f
    for f in "$@"; do
        if [ -s "$f" ]; then grep -v '^\s*$' "$f" | tail -n 1; return; fi
    done
    echo "(no log)"
}

# launch NAME LOG CMD...: start CMD in the background in its own session and
# record its pid in $D/pids/NAME.pid. CMD must stay in the foreground and exec
# (no fork) so that $! is the daemon itself.
launch() {
    local name=$1 log=$2
    shift 2
    setsid "$@" </dev/null >>"$log" 2>&1 &
    echo $! >"$D/pids/$name.pid"
}

# wait_for NAME SECONDS LOG CMD...: retry CMD until it succeeds; give up when
# the daemon NAME has died or the time is out.
wait_for() {
    local name=$1 secs=$2 log=$3 pid end
    shift 3
    pid=$(cat "$D/pids/$name.pid")
    end=$(( $(date +%s) + secs ))
    until "$@" >/dev/null 2>&1; do
        if ! alive "$pid"; then
            fail "$name" "exited: $(last_log_line "$log" "$D/log/$name.out")"
        fi
        if [ "$(date +%s)" -ge "$end" ]; then
            fail "$name" "not ready after ${secs}s: $(last_log_line "$log" "$D/log/$name.out")"
        fi
        sleep 0.2
    done
}

fail() {
    [ -n "${SLURM_SH_KEEP:-}" ] && die "$1 failed (kept running): $2"
    local name=$1 msg=$2
    echo "slurm.sh: stopping what was started in $D" >&2
    cmd_stop "$D" >&2 || true
    die "$name failed: $msg"
}

free_ports() {  # N free TCP ports on 127.0.0.1
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# ---------------------------------------------------------------- start

cmd_start() {
    [ $# = 1 ] || die "usage: slurm.sh start DIR"
    [ "$(id -u)" = 0 ] || die "start failed: not root (slurmd must run as root)"
    have_all || die "start failed: Slurm is not installed (run: .ci/slurm.sh install)"
    mkdir -p "$1"
    D=$(cd "$1" && pwd)
    [ ! -e "$D/pids" ] || die "start failed: $D already holds a cluster (stop it first)"
    chmod 755 "$D"
    # Every folder above DIR must be searchable by the slurm and munge users.
    setpriv --reuid=slurm --regid=slurm --clear-groups test -x "$D" \
        || die "start failed: $D is not reachable by the slurm user (use a folder under /tmp)"
    local t0 host cpus mem ctld_port slurmd_port dbd_port
    t0=$(now)
    mkdir -p "$D"/{etc,pids,log,run,munge,mysql/data,state/ctld,state/d}
    chown slurm:slurm "$D/state/ctld" "$D/log" "$D/run"
    chown munge:munge "$D/munge"
    chmod 755 "$D/munge"   # the socket is used by slurm and root too
    chown -R mysql:mysql "$D/mysql"

    host=$(hostname -s)
    # The node line as slurmd sees this machine, minus UpTime; RealMemory 95%
    # of what it counts, so that a little drift never drains the node.
    local node
    node=$(slurmd -C | grep '^NodeName=')
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node")
    mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    mem=$(( mem * 95 / 100 ))
    node=$(sed -e 's/ RealMemory=[0-9]*//' <<<"$node")
    read -r ctld_port slurmd_port dbd_port < <(free_ports 3)
    local sock="$D/munge/munge.socket.2"
    local dbpass
    dbpass=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')

    cat >"$D/etc/slurm.conf" <<EOF
# Written by .ci/slurm.sh start $D
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it may start again (default 120 s).
AuthInfo=socket=$sock,cred_expire=10
StateSaveLocation=$D/state/ctld
SlurmdSpoolDir=$D/state/d
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$D/etc/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
# The munge socket for talking to slurmdbd (AuthInfo is not used for that).
AccountingStoragePass=$sock
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
KillWait=5
MinJobAge=30
InactiveLimit=0
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
$node RealMemory=$mem NodeAddr=127.0.0.1 State=UNKNOWN
# OverSubscribe: up to 4 jobs share a CPU, so that tests running side by side
# (two pytest workers) do not wait for each other's jobs on a 2-CPU node.
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP PriorityTier=1 OverSubscribe=FORCE:4
# A higher tier on the same node: a job here preempts (requeues) debug jobs.
PartitionName=urgent Nodes=$host Default=NO MaxTime=INFINITE State=UP PriorityTier=2
EOF
    : >"$D/etc/plugstack.conf"   # not /etc/slurm/plugstack.conf
    cat >"$D/etc/slurmdbd.conf" <<EOF
# Written by .ci/slurm.sh start $D
AuthType=auth/munge
AuthInfo=socket=$sock
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=slurm
LogFile=$D/log/slurmdbd.log
PidFile=$D/run/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$dbpass
StorageLoc=slurm_acct_db
EOF
    chown slurm:slurm "$D/etc/slurmdbd.conf"
    chmod 600 "$D/etc/slurmdbd.conf"
    # The MariaDB client library in slurmdbd reads $MYSQL_HOME/my.cnf: that
    # is how it finds the server's socket under DIR (no TCP port).
    cat >"$D/mysql/my.cnf" <<EOF
[client]
socket=$D/mysql/mysqld.sock
EOF
    chmod 644 "$D/mysql/my.cnf"
    chmod 755 "$D/mysql"
    export SLURM_CONF="$D/etc/slurm.conf"

    # munged, as the munge user, with its own key, socket, seed and log.
    mungekey --create --keyfile="$D/munge/munge.key" >/dev/null 2>&1 \
        || fail munged "mungekey could not write a key"
    chown munge:munge "$D/munge/munge.key"
    chmod 400 "$D/munge/munge.key"
    launch munged "$D/log/munged.out" setpriv --reuid=munge --regid=munge --init-groups \
        munged --foreground --socket="$sock" --key-file="$D/munge/munge.key" \
        --pid-file="$D/munge/munged.pid" --log-file="$D/munge/munged.log" \
        --seed-file="$D/munge/munged.seed"
    wait_for munged 15 "$D/munge/munged.log" bash -c "munge -n -S '$sock' | unmunge -S '$sock'"

    # MariaDB: its own datadir and socket, no network.
    mariadb-install-db --no-defaults --user=mysql --datadir="$D/mysql/data" \
        --auth-root-authentication-method=socket --skip-test-db \
        >"$D/log/mariadb-install-db.out" 2>&1 \
        || fail mariadbd "mariadb-install-db: $(last_log_line "$D/log/mariadb-install-db.out")"
    launch mariadbd "$D/log/mariadbd.out" mariadbd --no-defaults --user=mysql \
        --datadir="$D/mysql/data" --socket="$D/mysql/mysqld.sock" --skip-networking \
        --pid-file="$D/mysql/mariadbd.pid" --log-error="$D/log/mariadbd.log" \
        --innodb-buffer-pool-size=64M --innodb-log-file-size=16M
    wait_for mariadbd 30 "$D/log/mariadbd.log" \
        mariadb-admin --no-defaults -S "$D/mysql/mysqld.sock" -u root ping
    mariadb --no-defaults -S "$D/mysql/mysqld.sock" -u root >"$D/log/mariadb-setup.out" 2>&1 <<EOF \
        || fail mariadbd "creating slurm_acct_db: $(last_log_line "$D/log/mariadb-setup.out")"
CREATE DATABASE slurm_acct_db;
CREATE USER 'slurm'@'localhost' IDENTIFIED BY '$dbpass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF

    # slurmdbd (switches to SlurmUser itself); accounts before slurmctld.
    launch slurmdbd "$D/log/slurmdbd.out" env MYSQL_UNIX_PORT="$D/mysql/mysqld.sock" MARIADB_HOME="$D/mysql" MYSQL_HOME="$D/mysql" SLURM_CONF="$SLURM_CONF" slurmdbd -D
    wait_for slurmdbd 30 "$D/log/slurmdbd.log" sacctmgr -n list cluster
    sacctmgr -i add cluster "$CLUSTER" >"$D/log/sacctmgr.out" 2>&1 \
        || fail slurmdbd "sacctmgr add cluster: $(last_log_line "$D/log/sacctmgr.out")"
    sacctmgr -i add account eicl Cluster="$CLUSTER" Description=tests Organization=eicl >>"$D/log/sacctmgr.out" 2>&1 \
        || fail slurmdbd "sacctmgr add account: $(last_log_line "$D/log/sacctmgr.out")"
    sacctmgr -i add user root Account=eicl Cluster="$CLUSTER" >>"$D/log/sacctmgr.out" 2>&1 \
        || fail slurmdbd "sacctmgr add user: $(last_log_line "$D/log/sacctmgr.out")"

    launch slurmctld "$D/log/slurmctld.out" slurmctld -D -i -f "$SLURM_CONF"
    wait_for slurmctld 30 "$D/log/slurmctld.log" bash -c "scontrol ping | grep -q UP"
    launch slurmd "$D/log/slurmd.out" slurmd -D -f "$SLURM_CONF"
    wait_for slurmd 30 "$D/log/slurmd.log" bash -c "sinfo -h -n '$host' -o %T | grep -qx idle"
    # slurmctld registered with slurmdbd: the cluster has a control host.
    wait_for slurmctld 30 "$D/log/slurmctld.log" \
        bash -c "sacctmgr -n -P list cluster '$CLUSTER' format=ControlHost | grep -q ."

    echo "slurm.sh: cluster $CLUSTER up in $(elapsed "$t0") s (node $host, $cpus CPUs, ${mem} MB; logs in $D/log)" >&2
    echo "export SLURM_CONF=$SLURM_CONF"
}

# ---------------------------------------------------------------- stop

# stop_pid NAME PID: TERM, wait up to 15 s, then KILL; done when the process
# is gone or a zombie (on these machines pid 1 may reap late).
stop_pid() {
    local name=$1 pid=$2 i
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 150); do alive "$pid" || return 0; sleep 0.1; done
    echo "slurm.sh: $name ($pid) ignored TERM: KILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
    for i in $(seq 100); do alive "$pid" || return 0; sleep 0.1; done
    echo "slurm.sh: $name ($pid) still alive after KILL" >&2
    return 1
}

cmd_stop() {
    [ $# = 1 ] || die "usage: slurm.sh stop DIR"
    [ -d "$1" ] || die "stop failed: no folder $1"
    local D t0 rc=0 i name pid
    D=$(cd "$1" && pwd)
    [ -d "$D/pids" ] || { echo "slurm.sh: nothing started in $D" >&2; return 0; }
    t0=$(now)
    export SLURM_CONF="$D/etc/slurm.conf"
    # Jobs first, while slurmctld and slurmd are up, so no job outlives them.
    if [ -f "$D/pids/slurmctld.pid" ] && alive "$(cat "$D/pids/slurmctld.pid")"; then
        if [ -n "$(timeout 10 squeue -h -o %i 2>/dev/null)" ]; then
            timeout 10 scancel --full --state=RUNNING 2>/dev/null || true
            timeout 10 scancel 2>/dev/null || true  # the pending ones too
            timeout 10 scancel --user=root 2>/dev/null || true
            for i in $(seq 100); do
                [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
                sleep 0.2
            done
        fi
    fi
    for (( i=${#DAEMONS[@]}-1; i>=0; i-- )); do
        name=${DAEMONS[$i]}
        [ -f "$D/pids/$name.pid" ] || continue
        pid=$(cat "$D/pids/$name.pid")
        stop_pid "$name" "$pid" || rc=1
    done
    # Any slurmstepd or job step left (they hold DIR's slurmd log or spool
    # files open): ours, so stop them by pid too.
    local fd p
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        [ "$pid" = $$ ] && continue
        for fd in "$p"/fd/*; do
            if [[ "$(readlink "$fd" 2>/dev/null)" == "$D/"* ]]; then
                if alive "$pid"; then
                    echo "slurm.sh: leftover $(cat "$p/comm" 2>/dev/null) ($pid) holds $D: stopping it" >&2
                    stop_pid leftover "$pid" || rc=1
                fi
                break
            fi
        done
    done
    mv "$D/pids" "$D/pids.stopped.$(date +%s)"
    echo "slurm.sh: stopped in $(elapsed "$t0") s" >&2
    return $rc
}

case "${1:-}" in
    install) shift; cmd_install "$@" ;;
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    *) die "usage: slurm.sh install | start DIR | stop DIR" ;;
esac
