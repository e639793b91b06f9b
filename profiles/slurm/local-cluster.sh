#!/usr/bin/env bash
# Throwaway single-node SLURM cluster on localhost, with accounting (slurmdbd + MariaDB),
# for trying the SLURM profile (`snakemake --profile profiles/slurm`) and for the tests.
#
#   profiles/slurm/local-cluster.sh start    install what is missing, start all daemons
#   profiles/slurm/local-cluster.sh status   daemons recorded, sinfo; exit 0 if usable
#   profiles/slurm/local-cluster.sh stop     end exactly the recorded daemons
#
# Needs root on Debian 12 (apt, writes /etc/slurm and /etc/munge). Everything runs as root
# except munged (munge user) and mariadbd (drops to mysql): the cluster is throwaway.
#
# Environment:
#   CAI_SLURM_DIR   state folder (default /tmp/cai-slurm): SLURM state and spool, logs, the pid
#                   list, the MariaDB datadir and copies of the configs. Deleting it (after
#                   `stop`) resets the cluster, accounting included.
#   CAI_SLURM_CPUS  CPUs the node advertises (default: nproc). More than the cores lets more
#                   1-CPU jobs run at once (slurmd accepts it thanks to config_overrides).
set -euo pipefail

readonly STATE="${CAI_SLURM_DIR:-/tmp/cai-slurm}"
readonly PIDS="$STATE/pids"
readonly LOGS="$STATE/log"
readonly CLUSTER=cai
readonly ACCOUNT=cai
readonly PARTITION=debug
# Standard paths: clients (sbatch, sacct, squeue) and job steps look there without options.
readonly SLURM_CONF=/etc/slurm/slurm.conf
readonly SLURMDBD_CONF=/etc/slurm/slurmdbd.conf
readonly MUNGE_KEY=/etc/munge/munge.key
readonly MUNGE_RUN=/run/munge
readonly MYSQL_RUN=/run/mysqld
readonly MYSQL_SOCK="$MYSQL_RUN/mysqld.sock"
readonly WAIT_S=60          # bound for each "wait until the daemon answers"
readonly STOP_WAIT_S=10     # TERM grace before KILL
# Start order; stop walks it backwards (slurmd first, munged last).
readonly DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
readonly PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)

NODE="$(hostname -s)"
readonly NODE
T0="${EPOCHREALTIME//[.,]/}"

# ---------------------------------------------------------------------------- helpers

# One line per step, prefixed with the seconds since the script started.
say() {
    local now us
    now="${EPOCHREALTIME//[.,]/}"
    us=$((now - T0))
    printf '[%3d.%01ds] %s\n' $((us / 1000000)) $(((us / 100000) % 10)) "$*"
}

die() {
    printf 'local-cluster: error: %s\n' "$*" >&2
    exit 1
}

# PID recorded for a daemon in $PIDS, empty if none.
recorded_pid() {
    [[ -f $PIDS ]] || return 0
    awk -v n="$1" '$1 == n { p = $2 } END { if (p) print p }' "$PIDS"
}

# True if the process exists and is not a zombie. An ended daemon whose parent is gone stays
# a zombie until init reaps it (about 1 s here): kill -0 alone would call it alive.
alive() {
    local stat
    [[ -n $1 ]] && kill -0 "$1" 2>/dev/null || return 1
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ ${stat:0:1} != Z ]]
}

# True if the PID is alive AND still runs the named program: guards against a recorded PID
# that was reused by something else (e.g. the state folder outlived a reboot).
pid_is() {
    local pid="$1" name="$2" comm
    alive "$pid" || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    [[ $comm == "$name"* ]]
}

record_pid() {
    printf '%s %s\n' "$1" "$2" >>"$PIDS"
}

# Start a daemon in the foreground mode of its own, in the background, so that $! is the
# daemon itself (setsid and setpriv exec, they do not fork here). setsid detaches it from the
# caller's terminal and process group: Ctrl-C on a later command does not reach it.
# Usage: launch NAME LOGFILE CMD...   (the PID is recorded at once)
launch() {
    local name="$1" log="$2"
    shift 2
    setsid "$@" </dev/null >>"$log" 2>&1 &
    record_pid "$name" "$!"
}

# Wait until CMD... succeeds, at most $WAIT_S seconds; fail naming the daemon and its log if
# it does not, or as soon as the daemon's process has died.
# Usage: wait_for NAME LOGFILE CMD...
wait_for() {
    local name="$1" log="$2" pid i
    shift 2
    pid="$(recorded_pid "$name")"
    for ((i = 0; i < WAIT_S * 5; i++)); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        if [[ -n $pid ]] && ! alive "$pid"; then
            tail -n 15 "$log" >&2 || true
            die "$name (pid $pid) died while starting; see $log"
        fi
        sleep 0.2
    done
    tail -n 15 "$log" >&2 || true
    die "$name did not come up within ${WAIT_S}s; see $log"
}

# Node state as sinfo prints it (idle, mixed, allocated, unknown, down*, drained...).
node_state() {
    sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1
}

node_usable() {
    case "$(node_state)" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

# All recorded daemons alive and the node accepting jobs.
cluster_up() {
    local d
    [[ -f $PIDS ]] || return 1
    for d in "${DAEMONS[@]}"; do
        pid_is "$(recorded_pid "$d")" "$d" || return 1
    done
    node_usable
}

random_password() {
    # Hex only: no quoting issues in SQL or in slurmdbd.conf.
    od -An -N 24 -tx1 /dev/urandom | tr -d ' \n'
}

# ---------------------------------------------------------------------------- start steps

install_packages() {
    local missing=() c
    for c in slurmctld slurmd slurmdbd munged mungekey mariadbd mariadb-install-db sacctmgr sbatch; do
        command -v "$c" >/dev/null 2>&1 || missing+=("$c")
    done
    if ((${#missing[@]} == 0)); then
        say "packages present"
        return
    fi
    say "missing: ${missing[*]}; installing ${PACKAGES[*]} (apt log: $LOGS/apt.log)"
    # No systemd here and Debian's policy-rc.d blocks service starts: installing starts
    # nothing, every daemon is started below. --no-install-recommends: 9 packages, not 43.
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >>"$LOGS/apt.log" 2>&1 || die "apt-get update failed; see $LOGS/apt.log"
    apt-get install -y --no-install-recommends "${PACKAGES[@]}" >>"$LOGS/apt.log" 2>&1 ||
        die "apt-get install failed; see $LOGS/apt.log"
    say "installed: $(awk '/^Setting up / { printf "%s%s", sep, $3; sep = " " }' "$LOGS/apt.log")"
}

make_dirs() {
    mkdir -p "$STATE"/{state,spool,conf} "$LOGS"
    # The state folder holds the DB password (slurmdbd.conf copy): root only, except what the
    # two unprivileged daemons must reach.
    chmod 0711 "$STATE"
    chmod 0700 "$STATE/conf"
    mkdir -p "$MUNGE_RUN" "$MYSQL_RUN" /etc/slurm
    chown munge:munge "$MUNGE_RUN"
    chmod 0755 "$MUNGE_RUN"
    # mariadbd writes its pid file after dropping to mysql: a root-owned /run/mysqld fails
    # with Errcode 13.
    chown mysql:mysql "$MYSQL_RUN"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        # A munged we did not start (not recorded) is serving the socket: use it, leave it.
        say "munged already answering (not started here; not recorded, not stopped)"
        return
    fi
    if [[ ! -s $MUNGE_KEY ]]; then
        mungekey --create --keyfile="$MUNGE_KEY"
        say "created $MUNGE_KEY"
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    # munged refuses a log file it does not own; create it for the munge user.
    touch "$LOGS/munged.log"
    chown munge:munge "$LOGS/munged.log"
    launch munged "$LOGS/munged.log" \
        setpriv --reuid=munge --regid=munge --init-groups \
        munged --foreground --log-file="$LOGS/munged.log"
    wait_for munged "$LOGS/munged.log" bash -c 'munge -n | unmunge'
    say "munged up"
}

start_mariadb() {
    local datadir="$STATE/mysql" pw="$1"
    if [[ ! -d $datadir/mysql ]]; then
        mkdir -p "$datadir"
        chown mysql:mysql "$datadir"
        # Root logs in through the unix socket as unix root: no root password to keep.
        mariadb-install-db --no-defaults --user=mysql --datadir="$datadir" \
            --auth-root-authentication-method=socket --skip-test-db \
            >>"$LOGS/mariadb-install.log" 2>&1 ||
            die "mariadb-install-db failed; see $LOGS/mariadb-install.log"
        say "initialised MariaDB datadir $datadir"
    fi
    # --no-defaults: ignore /etc/mysql (its socket/bind settings); --skip-networking: no TCP
    # port at all, StorageHost=localhost reaches the socket.
    # It logs to stderr (no --log-error: mysql could not create a file in the root-owned log
    # folder), which launch sends to mariadbd.log.
    launch mariadbd "$LOGS/mariadbd.log" \
        mariadbd --no-defaults --user=mysql --datadir="$datadir" \
        --socket="$MYSQL_SOCK" --pid-file="$MYSQL_RUN/mysqld.pid" --skip-networking \
        --innodb-buffer-pool-size=64M
    wait_for mariadbd "$LOGS/mariadbd.log" mariadb-admin --socket="$MYSQL_SOCK" ping
    # A fresh password every start: nothing secret is hard-coded or reused.
    mariadb --socket="$MYSQL_SOCK" <<SQL || die "creating the slurm DB user failed"
CREATE USER IF NOT EXISTS 'slurm'@'localhost';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pw';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
    say "mariadbd up (socket $MYSQL_SOCK, no TCP)"
}

write_slurmdbd_conf() {
    local pw="$1"
    # Written with umask 077: it holds the DB password (slurmdbd also insists on mode 600).
    (
        umask 077
        cat >"$SLURMDBD_CONF" <<EOF
# Written by profiles/slurm/local-cluster.sh; overwritten at every start.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
LogFile=$LOGS/slurmdbd.log
PidFile=$STATE/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$pw
StorageLoc=slurm_acct_db
EOF
        cp "$SLURMDBD_CONF" "$STATE/conf/slurmdbd.conf"
    )
}

write_slurm_conf() {
    local cpus="${CAI_SLURM_CPUS:-$(nproc)}" mem headroom
    mem="$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n 1)"
    [[ -n $mem ]] || die "could not read RealMemory from 'slurmd -C'"
    # Leave room for the daemons and MariaDB: 10% of the memory, at least 512 MB.
    headroom=$((mem / 10 > 512 ? mem / 10 : 512))
    mem=$((mem - headroom))
    ((mem >= 500)) || die "only ${mem} MB usable for jobs after headroom"
    cat >"$SLURM_CONF" <<EOF
# Written by profiles/slurm/local-cluster.sh; overwritten at every start.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Bind slurmctld and slurmd to their configured address (127.0.0.1), not to every interface.
# (slurmdbd has no such option: it listens on all interfaces, port 6819, munge-authenticated.)
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny

StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log

# No cgroups without systemd in a container: plain process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without it a job gets the whole node's memory and jobs run one at a time.
DefMemPerCPU=500
MailProg=/bin/true
# A node that was down comes back by itself once slurmd registers.
ReturnToService=2
MaxArraySize=1001
# Finished jobs stay visible to squeue for 5 min (needed if the plugin polls squeue).
MinJobAge=300
KillWait=5
InactiveLimit=0
# Accept CPUs= above the real core count (CAI_SLURM_CPUS).
SlurmdParameters=config_overrides

AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux

NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    cp "$SLURM_CONF" "$STATE/conf/slurm.conf"
    say "wrote $SLURM_CONF (node $NODE: CPUs=$cpus RealMemory=$mem)"
}

start_slurmdbd() {
    launch slurmdbd "$LOGS/slurmdbd.out" slurmdbd -D
    wait_for slurmdbd "$LOGS/slurmdbd.log" sacctmgr -n list cluster
    say "slurmdbd up"
}

register_cluster() {
    if ! sacctmgr -n -P list cluster format=cluster | grep -x "$CLUSTER" >/dev/null; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
        say "registered cluster $CLUSTER in accounting"
    fi
}

start_slurmctld() {
    launch slurmctld "$LOGS/slurmctld.out" slurmctld -D
    wait_for slurmctld "$LOGS/slurmctld.log" bash -c 'scontrol ping | grep -q UP'
    say "slurmctld up"
}

start_slurmd() {
    launch slurmd "$LOGS/slurmd.out" slurmd -D
    say "slurmd started"
}

register_account() {
    if ! sacctmgr -n -P list account "$ACCOUNT" format=account | grep -x "$ACCOUNT" >/dev/null; then
        sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" >/dev/null
    fi
    if ! sacctmgr -n -P list assoc cluster="$CLUSTER" account="$ACCOUNT" user=root format=user |
        grep -x root >/dev/null; then
        sacctmgr -i add user root account="$ACCOUNT" defaultaccount="$ACCOUNT" >/dev/null
    fi
    # root already exists (default account root) once the cluster is added: make ours default.
    if ! sacctmgr -n -P list user root format=defaultaccount | grep -x "$ACCOUNT" >/dev/null; then
        sacctmgr -i modify user root set defaultaccount="$ACCOUNT" >/dev/null
    fi
    say "account $ACCOUNT with user root (default account) registered"
}

wait_node_idle() {
    local i state pid
    pid="$(recorded_pid slurmd)"
    for ((i = 0; i < WAIT_S * 5; i++)); do
        state="$(node_state)"
        case "$state" in
            idle) say "node $NODE idle"; return 0 ;;
            # Left down/drained by an earlier run (state folder kept): put it back.
            down* | drain* | fail*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        if ! alive "$pid"; then
            tail -n 15 "$LOGS/slurmd.log" >&2 || true
            die "slurmd (pid $pid) died while starting; see $LOGS/slurmd.log"
        fi
        sleep 0.2
    done
    tail -n 15 "$LOGS/slurmd.log" >&2 || true
    die "node $NODE not idle within ${WAIT_S}s (state '${state:-?}'); see $LOGS/slurmd.log and $LOGS/slurmctld.log"
}

cmd_start() {
    [[ $EUID -eq 0 ]] || die "run as root (installs packages, writes /etc/slurm)"
    if cluster_up; then
        say "cluster already up (state $STATE), node $NODE $(node_state)"
        return 0
    fi
    if [[ -s $PIDS ]]; then
        say "cluster recorded in $STATE is only partly up: stopping it first"
        cmd_stop
    fi
    mkdir -p "$LOGS"
    install_packages
    make_dirs
    : >"$PIDS"
    local pw
    pw="$(random_password)"
    start_munge
    start_mariadb "$pw"
    write_slurmdbd_conf "$pw"
    write_slurm_conf
    start_slurmdbd
    register_cluster
    start_slurmctld
    start_slurmd
    register_account
    wait_node_idle
    say "cluster $CLUSTER up: partition $PARTITION, account $ACCOUNT, state in $STATE"
    cat <<EOF

Use it:   snakemake --profile profiles/slurm ...
          sbatch --wrap 'hostname'; squeue; sacct -X
Stop it:  profiles/slurm/local-cluster.sh stop
EOF
}

# ---------------------------------------------------------------------------- stop / status

# TERM, wait up to $STOP_WAIT_S, then KILL; only the recorded PID, and only if it still runs
# the program recorded for it.
stop_pid() {
    local name="$1" pid="$2" i
    if ! pid_is "$pid" "$name"; then
        say "$name (pid $pid) not running"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_WAIT_S * 10; i++)); do
        alive "$pid" || { say "$name (pid $pid) stopped"; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    say "$name (pid $pid) killed after ${STOP_WAIT_S}s"
}

cmd_stop() {
    local name pid i jobs
    if [[ ! -s $PIDS ]]; then
        say "nothing recorded in $PIDS: no cluster to stop"
        rm -f "$PIDS"
        return 0
    fi
    # Jobs still running would leave their processes behind once slurmd is gone (linuxproc):
    # cancel them while slurmctld can still do it.
    if pid_is "$(recorded_pid slurmctld)" slurmctld; then
        jobs="$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')" || true
        if [[ -n ${jobs// /} ]]; then
            say "cancelling jobs: $jobs"
            # shellcheck disable=SC2086  # one job id per word
            scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 100; i++)); do
                [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
                sleep 0.1
            done
        fi
    fi
    # Reverse start order: slurmd, slurmctld, slurmdbd (flushes to MariaDB), mariadbd, munged.
    while read -r name pid; do
        [[ -n ${name:-} && -n ${pid:-} ]] || continue
        stop_pid "$name" "$pid"
    done < <(tac "$PIDS")
    rm -f "$PIDS"
    say "stopped; logs kept in $LOGS"
}

cmd_status() {
    local name pid rc=0
    if [[ ! -s $PIDS ]]; then
        echo "no cluster recorded in $PIDS"
        return 1
    fi
    while read -r name pid; do
        [[ -n ${name:-} ]] || continue
        if pid_is "$pid" "$name"; then
            printf '%-10s %-8s running\n' "$name" "$pid"
        else
            printf '%-10s %-8s NOT running\n' "$name" "$pid"
            rc=1
        fi
    done <"$PIDS"
    sinfo 2>&1 || rc=1
    node_usable || rc=1
    return "$rc"
}

usage() {
    echo "usage: $0 {start|stop|status}" >&2
    exit 2
}

main() {
    (($# == 1)) || usage
    case "$1" in
        start) cmd_start ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        *) usage ;;
    esac
}

main "$@"
