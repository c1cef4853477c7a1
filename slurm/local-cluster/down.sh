#!/usr/bin/env bash
# slurm/local-cluster/down.sh: stop the single-node Slurm cluster started by up.sh.
# Cancels all jobs, waits for them to end, then stops slurmd, slurmctld and (only if up.sh started it) munged, each
# by the PID in its PID file (checked against /proc/PID/comm first).
# Never kills by process name. Safe to run when nothing is running.
#
#   --wipe    also remove $SLURM_LOCAL_ROOT (state, spool, logs)
#   --purge   also --wipe, remove /etc/slurm/slurm.conf (if ours) and apt-get
#             purge slurmctld slurmd slurm-client slurm-wlm-basic-plugins munge
set -uo pipefail

ROOT=${SLURM_LOCAL_ROOT:-/tmp/slurm-local}
CONF=/etc/slurm/slurm.conf
MARK="# managed by slurm/local-cluster/up.sh"
WIPE=0; PURGE=0
for a in "$@"; do
  case "$a" in --wipe) WIPE=1 ;; --purge) PURGE=1; WIPE=1 ;; *) echo "unknown arg $a" >&2; exit 2 ;; esac
done
log() { echo "[slurm-down] $*" >&2; }

pid_alive() {
  local f=$1 name=$2 pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ]
}
stop_pid() {   # stop_pid FILE NAME
  local f=$1 name=$2 pid
  if pid_alive "$f" "$name"; then
    pid=$(cat "$f"); log "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null
    for _ in $(seq 1 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    if [ -d "/proc/$pid" ]; then log "$name $pid still alive, SIGKILL"; kill -9 "$pid" 2>/dev/null; fi
  fi
  rm -f "$f"
}

# 1. cancel every job while the controller still answers, and wait for the
#    job steps (slurmstepd + user processes) to be gone
if pid_alive "$ROOT/slurmctld.pid" slurmctld && command -v squeue >/dev/null; then
  jobs=$(squeue -h -o '%A' 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null
    for _ in $(seq 1 150); do
      [ -z "$(squeue -h -t R,CG,PD -o '%A' 2>/dev/null)" ] && break; sleep 0.2
    done
  fi
  # any job-step processes slurmd still tracks on this node
  for _ in $(seq 1 50); do
    [ "$(scontrol listpids 2>/dev/null | tail -n +2 | wc -l)" = 0 ] && break; sleep 0.2
  done
fi

# 2. daemons, in reverse order of start
stop_pid "$ROOT/slurmd.pid" slurmd
stop_pid "$ROOT/slurmctld.pid" slurmctld
if [ -f "$ROOT/munged.pid" ]; then     # only if up.sh started it
  stop_pid "$ROOT/munged.pid" munged
else
  log "munged not started by up.sh; left alone"
fi

if [ "$WIPE" = 1 ]; then log "removing $ROOT"; rm -rf "$ROOT"; fi
if [ "$PURGE" = 1 ]; then
  if [ -f "$CONF" ] && grep -qF "$MARK" "$CONF"; then rm -f "$CONF"; fi
  log "purging packages"
  # only the packages up installed by name (+ the plugin package); the small
  # libraries they pulled in (libmunge2, libhwloc15, liblua5.1-0) are left,
  # and no autoremove is run, so nothing else on the machine is touched
  DEBIAN_FRONTEND=noninteractive apt-get purge -y -q slurmctld slurmd slurm-client \
    slurm-wlm-basic-plugins munge >/dev/null 2>&1
fi
log "done"
exit 0
