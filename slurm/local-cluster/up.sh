#!/usr/bin/env bash
# slurm/local-cluster/up.sh: bring up a real single-node Slurm cluster on this machine
# (Debian/Ubuntu with Slurm 22.05 or later, root, no systemd needed), to try slurm/submit.py
# without a cluster; the Slurm tests (tests/test_slurm.py) run against it.
#
# Idempotent: installs packages only if missing, rewrites the config only if it
# changed, starts only the daemons that are not already running (restarts them
# when the config changed), then waits until the node is idle.
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
set -euo pipefail

ROOT=${SLURM_LOCAL_ROOT:-/tmp/slurm-local}
CONF=/etc/slurm/slurm.conf
MARK="# managed by slurm/local-cluster/up.sh"
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
FRESH=${SLURM_LOCAL_FRESH:-1}

log() { echo "[slurm-up] $*" >&2; }
die() { echo "[slurm-up] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (daemons, /etc/slurm, munge key)"

# pid_alive FILE NAME: true when FILE holds the PID of a live process called NAME
pid_alive() {
  local f=$1 name=$2 pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ]
}

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
NODE=$(hostname -s)
# nproc alone would follow OMP_NUM_THREADS; the CPUs this machine gives us are wanted here.
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
if [ -n "${SLURM_LOCAL_MEM_MB:-}" ]; then MEM=$SLURM_LOCAL_MEM_MB
else MEM=$(awk '/^MemTotal:/ {printf "%d", $2/1024*0.8}' /proc/meminfo); fi
DEFMEM=$(( MEM / CPUS )); [ "$DEFMEM" -gt 1024 ] && DEFMEM=1024

new=$(mktemp)
cat >"$new" <<EOF
$MARK  (node=$NODE cpus=$CPUS mem=${MEM}M root=$ROOT)
ClusterName=localci
SlurmctldHost=$NODE(127.0.0.1)
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
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/slurmctld.pid
SlurmdPidFile=$ROOT/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=5
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM State=UNKNOWN
# 'debug' is the default; jobs in 'high' preempt (requeue) jobs in 'debug'
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=high  Nodes=$NODE Default=NO  MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF

mkdir -p /etc/slurm
changed=0
if ! cmp -s "$new" "$CONF"; then
  if [ -s "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    cp -p "$CONF" "$CONF.bak.$(date +%s)"; log "backed up foreign $CONF"
  fi
  install -m 644 "$new" "$CONF"; changed=1; log "wrote $CONF"
fi
rm -f "$new"
# cgroup.conf is not read with proctrack/linuxproc + task/none; keep a stub
# so a later switch to cgroup plugins does not trip over a missing file.
[ -e /etc/slurm/cgroup.conf ] || echo "CgroupPlugin=autodetect" >/etc/slurm/cgroup.conf

# ---------------------------------------------------------------- 4. daemons
stop_pid() {   # stop_pid FILE NAME
  local f=$1 name=$2 pid
  pid_alive "$f" "$name" || return 0
  pid=$(cat "$f"); log "stopping $name (pid $pid)"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
  [ -d "/proc/$pid" ] && kill -9 "$pid" 2>/dev/null || true
}
if [ "$changed" = 1 ]; then
  stop_pid "$ROOT/slurmd.pid" slurmd
  stop_pid "$ROOT/slurmctld.pid" slurmctld
fi

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

if pid_alive "$ROOT/slurmd.pid" slurmd; then
  log "slurmd already running (pid $(cat "$ROOT/slurmd.pid"))"
else
  log "starting slurmd"
  slurmd "${clean[@]}" -N "$NODE"
fi

# ---------------------------------------------------------------- 5. wait idle
state=""
for i in $(seq 1 $((TIMEOUT * 5))); do
  state=$(sinfo -h -N -n "$NODE" -p debug -o '%t' 2>/dev/null | head -1)
  case "$state" in
    idle|mix|alloc) break ;;
    down*|drain*|drng*|fail*) [ $((i % 10)) = 1 ] && scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.2
done
case "$state" in
  idle|mix|alloc) ;;
  *) sinfo -N -l >&2 || true; die "node $NODE not idle (state '$state'); see $ROOT/log/" ;;
esac
log "ready: node $NODE ($CPUS cpus, ${MEM}M) state=$state; install took ${t_install}s"
sinfo
