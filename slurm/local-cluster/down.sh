#!/usr/bin/env bash
# slurm/local-cluster/down.sh: stop the Slurm cluster that up.sh started with the same
# SLURM_LOCAL_ROOT (default /tmp/slurm-local). Cancels its jobs, waits for them to end, then stops
# the slurmd of each node, slurmctld and (only if up.sh started it) munged, each by the PID in its
# PID file under $SLURM_LOCAL_ROOT (checked against /proc/PID/comm first), and removes the network
# namespaces, bridge and /etc/hosts lines that up.sh --nodes N created. Never kills by process name.
# Safe to run when nothing is running.
#
# A slurmctld or slurmd that those PID files do not name (another cluster, or up.sh's with another
# SLURM_LOCAL_ROOT) is reported and left alone: its jobs are not cancelled, and munged keeps running
# for it.
#
#   --wipe    also remove $SLURM_LOCAL_ROOT (state, spool, logs)
#   --purge   also --wipe, remove the config (if up.sh wrote it) and apt-get purge slurmctld
#             slurmd slurm-client slurm-wlm-basic-plugins munge; refused while such a daemon runs
#
# Tunables (environment): SLURM_LOCAL_ROOT and SLURM_LOCAL_CONF, as for up.sh.
set -uo pipefail

ROOT=${SLURM_LOCAL_ROOT:-/tmp/slurm-local}
CONF=${SLURM_LOCAL_CONF:-/etc/slurm/slurm.conf}
export SLURM_CONF=$CONF
MARK="# managed by slurm/local-cluster/up.sh"
WIPE=0; PURGE=0
for a in "$@"; do
  case "$a" in
    --wipe) WIPE=1 ;;
    --purge) PURGE=1; WIPE=1 ;;
    *) echo "[slurm-down] unknown argument '$a'; usage: bash $0 [--wipe|--purge]" >&2; exit 2 ;;
  esac
done
log() { echo "[slurm-down] $*" >&2; }
if [ "$(id -u)" != 0 ]; then   # the daemons are root's: a user runs the script through sudo
  command -v sudo >/dev/null || { log "must run as root, and sudo is not installed"; exit 1; }
  exec sudo -E bash "$0" "$@"
fi

# shellcheck source=daemons.sh
source "$(dirname "$0")/daemons.sh"
# shellcheck source=nodes.sh
source "$(dirname "$0")/nodes.sh"

mapfile -t strays < <(stray_daemons)
for d in "${strays[@]}"; do
  log "left alone, with its jobs: ${d% *} (pid ${d#* }), not started by up.sh with SLURM_LOCAL_ROOT=$ROOT (no $ROOT/${d% *}*.pid names it)"
done
if [ ${#strays[@]} -gt 0 ] && [ "$PURGE" = 1 ]; then
  log "ERROR: --purge would remove the packages those Slurm daemons run on; nothing was changed"
  exit 1
fi

# 1. cancel every job while our controller still answers (the config must be ours too: squeue
#    asks the controller it names), and wait for the job steps (slurmstepd + user processes) to be gone
if pid_alive "$ROOT/slurmctld.pid" slurmctld && grep -qF "$MARK" "$CONF" 2>/dev/null \
   && command -v squeue >/dev/null; then
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

# 2. daemons, in reverse order of start, then the nodes' network
stop_slurm_daemons
network_down
if [ ! -f "$ROOT/munged.pid" ]; then
  log "munged not started by up.sh; left alone"
elif [ ${#strays[@]} -gt 0 ]; then
  log "munged left running for the Slurm daemons above"
else
  stop_pid "$ROOT/munged.pid" munged
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
