#!/usr/bin/env bash
# A throwaway, real SLURM cluster (with accounting) on this machine, on loopback only.
#
#   scripts/local_slurm.sh install
#   eval "$(scripts/local_slurm.sh start [--nodes 1|2] [--base DIR])"   # exports SLURM_CONF
#   scripts/local_slurm.sh status [--base DIR]
#   scripts/local_slurm.sh stop [--base DIR] [--clean]
#
# Everything (config, state, logs, MariaDB data, munge key and socket) lives in one fresh
# directory, so two clusters can run one after another, or side by side, without sharing state.
# The settings below follow shared/notes/local-slurm.md: each one fixes a failure seen there.
set -euo pipefail

# Daemons live in sbin, which a non-login root shell may not have on PATH.
export PATH="$PATH:/usr/sbin:/sbin"

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
CLUSTER_NAME=maestro
# Bounds for every wait loop, in tenths of a second.
WAIT_START=300
WAIT_STOP=100
WAIT_DRAIN=300
MARKER=.local_slurm

log() { printf '[local_slurm] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# ---------------------------------------------------------------- install

cmd_install() {
  local missing=() pkg
  for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    log "already installed: ${PACKAGES[*]}"
    return
  fi
  # A fresh image has no package lists; a stale one may point at files the mirror no longer has.
  if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
    apt-get update >&2
  fi
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
  fi
}

# ---------------------------------------------------------------- helpers

# Resolve BASE from --base, else from SLURM_CONF ($BASE/etc/slurm.conf).
resolve_base() {
  local given=$1
  if [ -n "$given" ]; then
    BASE=$given
  elif [ -n "${SLURM_CONF:-}" ]; then
    BASE=$(dirname "$(dirname "$SLURM_CONF")")
  else
    die "no cluster given: pass --base DIR or set SLURM_CONF"
  fi
  [ -f "$BASE/$MARKER" ] || die "$BASE is not a local_slurm directory"
  BASE=$(cd "$BASE" && pwd)
  export SLURM_CONF="$BASE/etc/slurm.conf"
}

port_in_use() {
  timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# Sets PICKED to the preferred port if nothing listens there, else to a random free one below
# the kernel's ephemeral range (so a client socket cannot grab it before the daemon binds).
TAKEN=" "
pick_port() {
  local port=$1 tries=0
  while [[ $TAKEN == *" $port "* ]] || port_in_use "$port"; do
    tries=$((tries + 1))
    [ "$tries" -le 100 ] || die "no free port found"
    port=$((20000 + RANDOM % 12000))
  done
  TAKEN+="$port "
  PICKED=$port
}

# Start a daemon in its own session with all its output in a log file: it must not hold the
# caller's stdout/stderr open, or `eval "$(local_slurm.sh start)"` would never return.
spawn() {
  local name=$1
  shift
  setsid "$@" </dev/null >>"$BASE/log/$name.out" 2>&1 &
  echo "$!" >"$BASE/pids/$name.pid"
}

# kill -0 alone is not enough: an exited daemon stays a zombie until init reaps it, and this
# machine's init reaps only every few seconds.
running() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

alive() {
  running "$(cat "$BASE/pids/$1.pid")" || die "$1 exited during start; see $BASE/log/"
}

# Milliseconds since the epoch; EPOCHREALTIME's decimal mark follows the locale.
now_ms() {
  local us=${EPOCHREALTIME//[.,]/}
  echo "${us::-3}"
}

elapsed() {
  local ms=$(($(now_ms) - T0))
  printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}

# Poll `cond` (a function name) every 0.1 s, at most $1 tenths, checking that the daemons in
# the remaining arguments are still running.
wait_for() {
  local limit=$1 cond=$2 i d
  shift 2
  for ((i = 0; i < limit; i++)); do
    if "$cond"; then
      log "$cond after $(elapsed) s"
      return 0
    fi
    for d in "$@"; do alive "$d"; done
    sleep 0.1
  done
  die "timed out waiting for $cond"
}

munge_ready() { timeout 5 munge -n -S "$BASE/munge/munge.sock" >/dev/null 2>&1; }
mariadb_ready() { timeout 5 mariadb --no-defaults -S "$BASE/mysqld.sock" -u root -e 'SELECT 1' >/dev/null 2>&1; }
dbd_ready() { port_in_use "$DBD_PORT" && timeout 5 sacctmgr -n show cluster >/dev/null 2>&1; }

cluster_ready() {
  local states clusters
  # A client that finds slurmctld not yet listening backs off for seconds before retrying.
  port_in_use "$CTLD_PORT" || return 1
  states=$(timeout 5 sinfo -h -N -o %T 2>/dev/null | sort -u) || return 1
  [ "$states" = idle ] || return 1
  [ "$(timeout 5 sinfo -h -N -o %N 2>/dev/null | sort -u | wc -l)" -eq "$NODES" ] || return 1
  # slurmctld registers the cluster in slurmdbd itself; until then jobs are not accounted.
  clusters=$(timeout 5 sacctmgr -n -P show cluster format=cluster 2>/dev/null) || return 1
  [ "$clusters" = "$CLUSTER_NAME" ]
}

# ---------------------------------------------------------------- start

write_munge_key() {
  mkdir -p "$BASE/munge"
  dd if=/dev/urandom of="$BASE/munge/munge.key" bs=1024 count=1 status=none
  chown -R munge:munge "$BASE/munge"
  # munged insists that everyone may reach its socket directory.
  chmod 755 "$BASE/munge"
  chmod 400 "$BASE/munge/munge.key"
}

write_slurm_conf() {
  local nodes_line partition_nodes
  if [ "$NODES" -eq 1 ]; then
    local cpus
    # nproc honours OMP_NUM_THREADS (set to 1 in many training environments): count the cores.
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    nodes_line="NodeName=localhost NodeAddr=127.0.0.1 Port=${SLURMD_PORTS[0]} CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=4000"
    partition_nodes=localhost
  else
    nodes_line="NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=${SLURMD_PORTS[0]} CPUs=1 RealMemory=2000
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=${SLURMD_PORTS[1]} CPUs=1 RealMemory=2000"
    partition_nodes="node[1-2]"
  fi
  # Job ids start at a random offset: submitit caches job states by id across clusters in one
  # process, so a second cluster reusing id 1 would look already finished.
  local first_job_id=$(((RANDOM % 30000 + 1) * 1000))
  cat >"$BASE/etc/slurm.conf" <<EOF
ClusterName=$CLUSTER_NAME
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5: the default 120 holds a requeued job back for 121 s; below 5 reverts to 120.
AuthInfo=socket=$BASE/munge/munge.sock,cred_expire=5
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
FirstJobId=$first_job_id
# proctrack/cgroup without a cgroup.conf drains the node yet reports jobs COMPLETED unrun.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Use the configured CPUs/memory, not what slurmd detects: two 1-CPU nodes share one machine.
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
# Jobs start ~1 s after submit and requeued jobs as soon as eligible; the defaults add 3-60 s.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# Without it a preempted job gets no USR2 and submitit never checkpoints.
SlurmctldParameters=preempt_send_user_signal
MailProg=/bin/true
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/jobcomp.log
KillWait=5
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# The slurmdbd connection ignores AuthInfo's socket; without this each call hangs.
AccountingStoragePass=$BASE/munge/munge.sock
$nodes_line
# GraceTime>0: with 0 Slurm requeues before submitit's own requeue, which then fails.
PartitionName=low Nodes=$partition_nodes Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=high Nodes=$partition_nodes MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
}

write_slurmdbd_conf() {
  # slurmdbd refuses a config that others can read: it holds the DB password.
  (
    umask 077
    cat >"$BASE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$BASE/munge/munge.sock
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$BASE/run/slurmdbd.pid
LogFile=$BASE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  )
}

start_mariadb() {
  # The default 96 MB redo log alone costs about a second to write; accounting needs little.
  local innodb=(--innodb-log-file-size=8M --innodb-buffer-pool-size=16M)
  mariadb-install-db --no-defaults --user=root --datadir="$BASE/mysql" --skip-test-db \
    --auth-root-authentication-method=socket "${innodb[@]}" >"$BASE/log/mariadb-install-db.out" 2>&1 \
    || die "mariadb-install-db failed; see $BASE/log/mariadb-install-db.out"
  spawn mariadbd mariadbd --no-defaults --user=root --datadir="$BASE/mysql" \
    --bind-address=127.0.0.1 --port="$DB_PORT" --socket="$BASE/mysqld.sock" \
    --pid-file="$BASE/run/mariadbd.pid" --log-error="$BASE/log/mariadbd.log" \
    --skip-name-resolve "${innodb[@]}"
  wait_for "$WAIT_START" mariadb_ready mariadbd
  timeout 5 mariadb --no-defaults -S "$BASE/mysqld.sock" -u root <<EOF
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

# On a failed start, stop whatever did start so no daemon outlives the attempt.
start_failed() {
  local rc=$?
  [ "$rc" -eq 0 ] && return
  log "start failed; stopping what was started (logs kept in $BASE/log)"
  stop_daemons
  exit "$rc"
}

cmd_start() {
  local base_arg=""
  NODES=1
  while [ $# -gt 0 ]; do
    case $1 in
      --nodes) NODES=${2:?}; shift 2 ;;
      --base) base_arg=${2:?}; shift 2 ;;
      *) usage ;;
    esac
  done
  [[ $NODES == 1 || $NODES == 2 ]] || die "--nodes must be 1 or 2"
  [ "$(id -u)" -eq 0 ] || die "must run as root (the daemons run as root, munged as munge)"
  local bin
  for bin in munged slurmctld slurmd slurmdbd mariadbd mariadb-install-db sbatch sacctmgr; do
    command -v "$bin" >/dev/null || die "$bin not found; run: $0 install"
  done

  T0=$(now_ms)
  if [ -n "$base_arg" ]; then
    mkdir -p "$base_arg"
    [ -z "$(ls -A "$base_arg")" ] || die "--base $base_arg is not empty: a reused state dir brings old jobs back"
    BASE=$(cd "$base_arg" && pwd)
  else
    BASE=$(mktemp -d -t local-slurm.XXXXXX)
  fi
  # munged runs as the munge user and must reach $BASE/munge.
  chmod 755 "$BASE"
  touch "$BASE/$MARKER"
  mkdir -p "$BASE"/{etc,state,run,log,pids,spool}
  setpriv --reuid=munge --regid=munge --clear-groups test -x "$BASE" \
    || die "the munge user cannot reach $BASE; pick a --base whose parents are world-searchable"
  trap start_failed EXIT

  pick_port 6817; CTLD_PORT=$PICKED
  pick_port 6819; DBD_PORT=$PICKED
  pick_port 3307; DB_PORT=$PICKED
  SLURMD_PORTS=()
  local i
  for ((i = 1; i <= NODES; i++)); do
    if [ "$NODES" -eq 1 ]; then pick_port 6818; else pick_port $((17000 + i)); fi
    SLURMD_PORTS+=("$PICKED")
  done
  DB_PASS=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
  export SLURM_CONF="$BASE/etc/slurm.conf"
  write_munge_key
  write_slurm_conf
  write_slurmdbd_conf
  log "base $BASE: slurmctld :$CTLD_PORT, slurmd :${SLURMD_PORTS[*]}, slurmdbd :$DBD_PORT, mariadb :$DB_PORT"

  # munged refuses its key file when run as root.
  spawn munged setpriv --reuid=munge --regid=munge --clear-groups \
    munged --foreground --socket="$BASE/munge/munge.sock" --key-file="$BASE/munge/munge.key" \
    --pid-file="$BASE/munge/munged.pid" --log-file="$BASE/munge/munged.log" \
    --seed-file="$BASE/munge/munged.seed"
  wait_for "$WAIT_START" munge_ready munged

  start_mariadb
  spawn slurmdbd slurmdbd -D
  wait_for "$WAIT_START" dbd_ready slurmdbd

  spawn slurmctld slurmctld -D
  local nodes=(localhost)
  [ "$NODES" -eq 1 ] || nodes=(node1 node2)
  local n
  for n in "${nodes[@]}"; do
    mkdir -p "$BASE/spool/$n"
    spawn "slurmd-$n" slurmd -D -N "$n"
  done
  local daemons=(munged mariadbd slurmdbd slurmctld)
  for n in "${nodes[@]}"; do daemons+=("slurmd-$n"); done
  wait_for "$WAIT_START" cluster_ready "${daemons[@]}"
  trap - EXIT

  printf 'export SLURM_CONF=%q\n' "$SLURM_CONF" >"$BASE/env.sh"
  log "cluster up in $(elapsed) s with $NODES node(s)"
  cat "$BASE/env.sh"
}

# ---------------------------------------------------------------- stop

# TERM, then KILL after a bounded wait. The command name is checked so that a recycled PID
# belonging to something else is never signalled.
kill_recorded() {
  local name=$1 comm=$2 file="$BASE/pids/$1.pid" pid i
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < WAIT_STOP; i++)); do
      running "$pid" || break
      sleep 0.1
    done
    if running "$pid"; then
      log "$name ($pid) ignored TERM; killing"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$file"
}

# slurmd before slurmctld, or slurmd hangs retrying its registration.
stop_daemons() {
  local f
  for f in "$BASE"/pids/slurmd-*.pid; do
    [ -e "$f" ] || continue
    f=$(basename "$f" .pid)
    kill_recorded "$f" slurmd
  done
  kill_recorded slurmctld slurmctld
  kill_recorded slurmdbd slurmdbd
  kill_recorded mariadbd mariadbd
  kill_recorded munged munged
}

# A job's slurmstepd outlives slurmd, so jobs are cancelled and drained while slurmctld is up.
drain_jobs() {
  local jobs i
  # Without slurmctld every squeue would only wait out its timeout.
  [ -f "$BASE/pids/slurmctld.pid" ] && running "$(cat "$BASE/pids/slurmctld.pid")" || return 0
  jobs=$(timeout 5 squeue -h -o %A 2>/dev/null) || return 0
  [ -n "$jobs" ] || return 0
  # shellcheck disable=SC2086 # one job id per word
  timeout 5 scancel $jobs 2>/dev/null || true
  for ((i = 0; i < WAIT_DRAIN; i++)); do
    jobs=$(timeout 5 squeue -h -o %A 2>/dev/null) || return 0
    [ -n "$jobs" ] || return 0
    sleep 0.1
  done
  log "jobs still listed after scancel: $jobs"
}

cmd_stop() {
  local base_arg="" clean=0
  while [ $# -gt 0 ]; do
    case $1 in
      --base) base_arg=${2:?}; shift 2 ;;
      --clean) clean=1; shift ;;
      *) usage ;;
    esac
  done
  resolve_base "$base_arg"
  drain_jobs
  stop_daemons
  if [ "$clean" -eq 1 ]; then
    rm -rf -- "$BASE"
    log "stopped and removed $BASE"
  else
    log "stopped; logs in $BASE/log"
  fi
}

cmd_status() {
  local base_arg=""
  while [ $# -gt 0 ]; do
    case $1 in
      --base) base_arg=${2:?}; shift 2 ;;
      *) usage ;;
    esac
  done
  resolve_base "$base_arg"
  echo "SLURM_CONF=$SLURM_CONF"
  timeout 5 sinfo
  timeout 5 squeue
}

case ${1:-} in
  install) shift; cmd_install "$@" ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  status) shift; cmd_status "$@" ;;
  *) usage ;;
esac
