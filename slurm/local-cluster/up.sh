#!/usr/bin/env bash
# slurm/local-cluster/up.sh: bring up a real Slurm cluster on this machine (Debian/Ubuntu with Slurm 22.05 or
# later, root (a user runs it through sudo), no systemd), to try slurm/submit.py without a cluster; the Slurm tests
# (tests/test_slurm.py) run against it.
#
#   bash slurm/local-cluster/up.sh [--nodes N] [--replace-existing]
#
# --nodes 1 (the default): one node, this machine itself, reached on 127.0.0.1.
# --nodes N (2 or more): N nodes localci-node1..N, each a network namespace of its own with its own address, host
# name and slurmd, on a bridge that also holds the controller's address (nodes.sh says how). Every node declares all
# of the machine's CPUs and 80% of its memory: N nodes oversubscribe the machine N times, which is what lets a 2-core
# machine run a job of 2 nodes x 2 tasks.
#
# Idempotent for its own cluster: installs packages only if missing, rewrites the config only if
# it changed, starts only the daemons that are not already running (restarts them when the
# config changed), then waits until the node is idle.
#
# It never takes over a Slurm it did not start: when the config lacks this script's marker line,
# or a slurmctld or slurmd runs that its PID files under $SLURM_LOCAL_ROOT do not name (another
# cluster, or this script's with another SLURM_LOCAL_ROOT), or a slurmctld answers 'scontrol ping'
# while its own is not running, it says what it found and exits with 1, changing nothing.
# --replace-existing takes such a cluster over instead: it stops those daemons by PID (their jobs
# are lost), backs up a foreign config to slurm.conf.bak.<time> and starts its own. A munged
# already running is used as it is and left alone.
#
# Everything lives under $SLURM_LOCAL_ROOT (default /tmp/slurm-local): state,
# spool, logs and the PID files of the daemons this script started. The
# config goes to /etc/slurm/slurm.conf (the path compiled into Debian's Slurm,
# so sbatch/srun/squeue need no SLURM_CONF). Tear down with down.sh.
#
# The node declares the machine's real CPU count (nproc): a 2-core machine runs one job of
# 2 one-CPU tasks, or two 1-task jobs, at a time.
#
# Tunables (environment):
#   SLURM_LOCAL_ROOT     state/log/pid dir            (default /tmp/slurm-local)
#   SLURM_LOCAL_MEM_MB   RealMemory of the node       (default: 80% of MemTotal)
#   SLURM_LOCAL_TIMEOUT  seconds to wait for idle     (default 60)
#   SLURM_LOCAL_FRESH    1 = start the daemons with -c: forget queued/running
#                        jobs of an earlier run (default 1). Job ids restart
#                        at 1 only after down.sh --wipe.
#   SLURM_LOCAL_CONF     the config file (default /etc/slurm/slurm.conf); another path is
#                        for tests only: Slurm commands outside this script would need
#                        SLURM_CONF to find it
set -euo pipefail

ROOT=${SLURM_LOCAL_ROOT:-/tmp/slurm-local}
CONF=${SLURM_LOCAL_CONF:-/etc/slurm/slurm.conf}
export SLURM_CONF=$CONF   # the daemons and commands started here read this config
MARK="# managed by slurm/local-cluster/up.sh"
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
FRESH=${SLURM_LOCAL_FRESH:-1}
HERE=$(dirname "$0")
USAGE="usage: bash $0 [--nodes N] [--replace-existing]"

log() { echo "[slurm-up] $*" >&2; }
die() { echo "[slurm-up] ERROR: $*" >&2; exit 1; }

REPLACE=0
NODES=1
args=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --replace-existing) REPLACE=1 ;;
    --nodes) NODES=${2:-}; [ $# -gt 1 ] && shift ;;
    --nodes=*) NODES=${1#--nodes=} ;;
    -h|--help) echo "$USAGE"; exit 0 ;;
    *) echo "[slurm-up] unknown argument '$1'; $USAGE" >&2; exit 2 ;;
  esac
  shift
done
case "$NODES" in
  [1-9]|[1-5][0-9]|6[0-4]) ;;
  *) echo "[slurm-up] --nodes must be a number from 1 to 64, not '$NODES'; $USAGE" >&2; exit 2 ;;
esac
set -- "${args[@]}"

# Root is needed (daemons, /etc/slurm, the munge key): a user runs the script through sudo.
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || die "must run as root (daemons, /etc/slurm, munge key), and sudo is not installed"
  exec sudo -E bash "$0" "$@"
fi

# shellcheck source=daemons.sh
source "$(dirname "$0")/daemons.sh"
# shellcheck source=nodes.sh
source "$(dirname "$0")/nodes.sh"

# slurmd's sockets are <spool folder>/<node>_<job id>.<step id> (up to 8 and 10 digits), and a Unix socket's path
# has at most 107 characters: a longer one makes every job step fail to start ("Unspecified error").
if [ "$NODES" = 1 ]; then longest_node=$(hostname -s); spool=$ROOT/spool
else longest_node=$(node_name "$NODES"); spool=$ROOT/spool/$longest_node; fi
sockets=$(( ${#spool} + ${#longest_node} + 21 ))
if [ "$sockets" -gt 107 ]; then
  die "SLURM_LOCAL_ROOT=$ROOT is too long: slurmd's sockets under it would have paths of up to $sockets characters, over the 107 of a Unix socket path; use a shorter folder. Nothing was changed."
fi

# ---------------------------------------------------------------- 0. someone else's Slurm?
found=()   # what this script did not start, one phrase each
if [ -s "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
  found+=("$CONF was not written by up.sh (it lacks the line '$MARK')")
fi
mapfile -t strays < <(stray_daemons)
for d in "${strays[@]}"; do
  found+=("${d% *} (pid ${d#* }) is running and no $ROOT/${d% *}*.pid names it")
done
if [ "$NODES" -gt 1 ]; then
  mapfile -t in_the_way < <(foreign_network "$NODES")
  if [ ${#in_the_way[@]} -gt 0 ]; then
    what=$(printf '%s; ' "${in_the_way[@]}")
    die "cannot create $NODES nodes: ${what%; }, and up.sh did not create it. Nothing was changed."
  fi
fi
unseen=0
# A controller this script cannot see as a process (e.g. in another PID namespace) still answers.
if [ ${#found[@]} = 0 ] && [ -s "$CONF" ] && ! pid_alive "$ROOT/slurmctld.pid" slurmctld \
   && timeout 10 scontrol ping 2>/dev/null | grep -q UP; then
  found+=("a slurmctld answers 'scontrol ping', but no slurmctld process runs here")
  unseen=1
fi
if [ ${#found[@]} -gt 0 ]; then
  what=$(printf '%s; ' "${found[@]}"); what=${what%; }
  if [ "$REPLACE" = 0 ]; then
    other=$(grep -F "$MARK" "$CONF" 2>/dev/null | sed -n '1s/.* root=\(.*\))$/\1/p' || true)
    if [ -n "$other" ] && [ "$other" != "$ROOT" ]; then
      hint="$CONF says up.sh started it with SLURM_LOCAL_ROOT=$other: to stop it, run 'SLURM_LOCAL_ROOT=$other bash $HERE/down.sh'"
    else
      hint="if up.sh started it with another SLURM_LOCAL_ROOT, stop it with 'SLURM_LOCAL_ROOT=<that root> bash $HERE/down.sh'"
    fi
    die "found a Slurm that up.sh did not start with SLURM_LOCAL_ROOT=$ROOT: $what. Nothing was changed. To use that cluster as it is, submit to it without running up.sh; to take it over (the daemons found are stopped and their jobs lost; a config up.sh did not write is backed up, then replaced), rerun with --replace-existing; $hint."
  fi
  [ "$unseen" = 0 ] || die "--replace-existing cannot stop a slurmctld that it cannot see: $what"
  log "--replace-existing: taking over: $what"
  for d in "${strays[@]}"; do stop_process "${d#* }" "${d% *}"; done
fi

# ---------------------------------------------------------------- 1. install
mkdir -p "$ROOT"/{state,spool,log}
chmod 755 "$ROOT"
t_install=$(date +%s)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurmctld slurmd slurm-client munge (apt log: $ROOT/log/apt.log)"
  export DEBIAN_FRONTEND=noninteractive
  pkgs=(slurmctld slurmd slurm-client munge)
  # try with the lists we have first; refresh them only if that fails
  if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$ROOT/log/apt.log" 2>&1; then
    apt-get update -q >>"$ROOT/log/apt.log" 2>&1
    apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$ROOT/log/apt.log" 2>&1 \
      || { tail -20 "$ROOT/log/apt.log" >&2; die "apt-get install failed"; }
  fi
fi
t_install=$(( $(date +%s) - t_install ))

# ---------------------------------------------------------------- 2. munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating munge key"
  mkdir -p /etc/munge
  if command -v mungekey >/dev/null; then mungekey --create --force --keyfile=/etc/munge/munge.key
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 755 /run/munge

if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "munged already answering"
  # forget a PID file left by an earlier run whose munged is gone
  pid_alive "$ROOT/munged.pid" munged || rm -f "$ROOT/munged.pid"
else
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged --force --pid-file=/run/munge/munged.pid
  for _ in $(seq 1 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
  cp /run/munge/munged.pid "$ROOT/munged.pid"   # marks it as started by us
fi

# ---------------------------------------------------------------- 3. config
HOST=$(hostname -s)
# nproc alone would follow OMP_NUM_THREADS; the CPUs this machine gives us are wanted here.
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
if [ -n "${SLURM_LOCAL_MEM_MB:-}" ]; then MEM=$SLURM_LOCAL_MEM_MB
else MEM=$(awk '/^MemTotal:/ {printf "%d", $2/1024*0.8}' /proc/meminfo); fi
DEFMEM=$(( MEM / CPUS )); [ "$DEFMEM" -gt 1024 ] && DEFMEM=1024
NODE_SPEC="CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM State=UNKNOWN"
if [ "$NODES" = 1 ]; then
  NODE=$HOST
  CONTROLLER_ADDR=127.0.0.1
  SLURMD_FILES="SlurmdSpoolDir=$ROOT/spool
SlurmdPidFile=$ROOT/slurmd.pid
SlurmdLogFile=$ROOT/log/slurmd.log"
  NODE_LINES="NodeName=$NODE NodeAddr=127.0.0.1 $NODE_SPEC"
else
  NODE="localci-node[1-$NODES]"
  CONTROLLER_ADDR=$SUBNET.1
  # %n: the node's name, one spool folder, PID file and log per slurmd
  SLURMD_FILES="SlurmdSpoolDir=$ROOT/spool/%n
SlurmdPidFile=$ROOT/slurmd-%n.pid
SlurmdLogFile=$ROOT/log/slurmd-%n.log"
  NODE_LINES=$(for i in $(seq 1 "$NODES"); do echo "NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") $NODE_SPEC"; done)
fi

new=$(mktemp)
cat >"$new" <<EOF
$MARK  (node=$NODE cpus=$CPUS mem=${MEM}M root=$ROOT)
ClusterName=localci
SlurmctldHost=$HOST($CONTROLLER_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start
# again (default 120 s); 5 s keeps requeue tests quick.
AuthInfo=cred_expire=5
MailProg=/bin/true
MpiDefault=none
# no systemd / cgroup delegation needed
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEFMEM
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=5
DependencyParameters=kill_invalid_depend
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# (22.05: preempt_send_user_signal is a SlurmctldParameters flag; PreemptParameters came later)
SlurmctldParameters=preempt_send_user_signal
ReturnToService=2
JobRequeue=1
StateSaveLocation=$ROOT/state
SlurmctldPidFile=$ROOT/slurmctld.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
$SLURMD_FILES
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=5
Waittime=0
$NODE_LINES
# 'debug' is the default; jobs in 'high' preempt (requeue) jobs in 'debug'
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=high  Nodes=$NODE Default=NO  MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF

mkdir -p "$(dirname "$CONF")"
changed=0
if ! cmp -s "$new" "$CONF"; then
  if [ -s "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    backup=$CONF.bak.$(date +%s)
    cp -p "$CONF" "$backup"; log "backed up foreign $CONF to $backup"
  fi
  install -m 644 "$new" "$CONF"; changed=1; log "wrote $CONF"
fi
rm -f "$new"
# cgroup.conf is not read with proctrack/linuxproc + task/none; keep a stub
# so a later switch to cgroup plugins does not trip over a missing file.
CGROUP_CONF=$(dirname "$CONF")/cgroup.conf
[ -e "$CGROUP_CONF" ] || echo "CgroupPlugin=autodetect" >"$CGROUP_CONF"

# ---------------------------------------------------------------- 4. network and daemons
if [ "$changed" = 1 ]; then
  stop_slurm_daemons
  network_down   # the nodes of another --nodes, if any
fi
if [ "$NODES" -gt 1 ]; then network_up "$NODES"; fi

clean=(); [ "$FRESH" = 1 ] && clean=(-c)
if pid_alive "$ROOT/slurmctld.pid" slurmctld; then
  log "slurmctld already running (pid $(cat "$ROOT/slurmctld.pid"))"
else
  log "starting slurmctld"
  slurmctld "${clean[@]}" -i
fi
# wait for the controller to answer before starting slurmd
for _ in $(seq 1 $((TIMEOUT * 5))); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping | grep -q UP || die "slurmctld not answering; see $ROOT/log/slurmctld.log"

if [ "$NODES" = 1 ]; then
  if pid_alive "$ROOT/slurmd.pid" slurmd; then
    log "slurmd already running (pid $(cat "$ROOT/slurmd.pid"))"
  else
    log "starting slurmd"
    slurmd "${clean[@]}" -N "$NODE"
  fi
else
  for i in $(seq 1 "$NODES"); do
    name=$(node_name "$i")
    if pid_alive "$ROOT/slurmd-$name.pid" slurmd; then
      log "slurmd of $name already running (pid $(cat "$ROOT/slurmd-$name.pid"))"
    else
      log "starting slurmd of $name"
      mkdir -p "$ROOT/spool/$name"
      start_node_slurmd "$name" "${clean[@]}"
    fi
  done
fi

# ---------------------------------------------------------------- 5. wait idle
# "NAME STATE" of each node that is not ready, or of all when sinfo does not list every node yet
not_ready() {
  local listed
  listed=$(sinfo -h -N -n "$NODE" -p debug -o '%N %t' 2>/dev/null)
  if [ "$(grep -c . <<<"$listed")" != "$NODES" ]; then echo "${listed:-none listed}"; return; fi
  awk '$2 !~ /^(idle|mix|alloc)$/' <<<"$listed"
}
waiting=""
for i in $(seq 1 $((TIMEOUT * 5))); do
  waiting=$(not_ready)
  [ -z "$waiting" ] && break
  if [ $((i % 10)) = 1 ] && grep -qE ' (down|drain|drng|fail)' <<<"$waiting"; then
    scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
  fi
  sleep 0.2
done
if [ -n "$waiting" ]; then
  sinfo -N -l >&2 || true
  die "not idle after ${TIMEOUT}s: $(tr '\n' ',' <<<"$waiting" | sed 's/,$//'); see $ROOT/log/"
fi
log "ready: $NODES node(s) $NODE ($CPUS cpus, ${MEM}M each); install took ${t_install}s"
sinfo
