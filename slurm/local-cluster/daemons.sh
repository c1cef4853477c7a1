# slurm/local-cluster/daemons.sh: the daemon helpers that up.sh and down.sh share (sourced by them;
# they define ROOT, the folder of the PID files, and log).

# live_process PID NAME: true when PID is a process called NAME that has not exited. A daemon's parent that exited
# as it went to the background stays a zombie of the same name until PID 1 reaps it, which may take seconds.
live_process() {
  local state
  [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] || return 1
  state=$(sed -n 's/^State:[[:space:]]*\(.\).*/\1/p' "/proc/$1/status" 2>/dev/null)
  [ -n "$state" ] && [ "$state" != Z ]
}

# pid_alive FILE NAME: true when FILE holds the PID of a live process called NAME
pid_alive() {
  local f=$1 name=$2 pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  [ -n "$pid" ] && live_process "$pid" "$name"
}

# stop_process PID NAME: TERM, and KILL after 10 s, if PID is still a process called NAME
stop_process() {
  local pid=$1 name=$2
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 0
  log "stopping $name (pid $pid)"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do live_process "$pid" "$name" || break; sleep 0.1; done
  if live_process "$pid" "$name"; then kill -9 "$pid" 2>/dev/null || true; fi
}

# stop_pid FILE NAME: stop the process FILE names (if it is NAME), forget FILE
stop_pid() {
  local f=$1 name=$2
  if pid_alive "$f" "$name"; then stop_process "$(cat "$f")" "$name"; fi
  rm -f "$f"
}

# stop_slurm_daemons: the slurmd of every node ($ROOT/slurmd.pid, or one $ROOT/slurmd-<node>.pid per node), then
# slurmctld
stop_slurm_daemons() {
  local f
  for f in "$ROOT"/slurmd.pid "$ROOT"/slurmd-*.pid; do
    if [ -e "$f" ]; then stop_pid "$f" slurmd; fi
  done
  stop_pid "$ROOT/slurmctld.pid" slurmctld
}

# stray_daemons: "NAME PID" for each slurmctld/slurmd running that no PID file of up.sh names ($ROOT/NAME.pid, or
# $ROOT/slurmd-<node>.pid of a multi-node cluster).
# Only those seen twice, 0.3 s apart, count: slurmd forks briefly as a job step starts.
stray_daemons() {
  local first
  first=$(scan_daemons)
  [ -n "$first" ] || return 0
  sleep 0.3
  scan_daemons | grep -Fx -- "$first" || true
}
scan_daemons() {
  local f name pid
  for f in /proc/[0-9]*/comm; do
    { read -r name <"$f"; } 2>/dev/null || continue
    case "$name" in slurmctld|slurmd) ;; *) continue ;; esac
    pid=${f#/proc/}; pid=${pid%/comm}
    live_process "$pid" "$name" || continue
    grep -qsx "$pid" "$ROOT/$name.pid" "$ROOT/$name"-*.pid || echo "$name $pid"
  done
}
