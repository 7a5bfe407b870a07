#!/usr/bin/env bash
# slurm-down.sh: stop the single-node SLURM cluster that scripts/slurm-up.sh started.
#
# Usage (as root):
#   bash scripts/slurm-down.sh
#
# It stops exactly the daemons listed in /run/diffcleanse-slurm/started (written by
# slurm-up.sh: slurmd, slurmctld, and with --accounting slurmdbd and mariadbd, then munged), in
# that order, and removes the state file. A daemon slurm-up.sh found already running (for
# example a munged started by someone else) is not listed there and is left alone. Jobs still in
# the queue are cancelled first (they belong to the cluster being stopped), so that no
# slurmstepd is left behind. Packages, /etc/slurm/*.conf and the logs in /var/log/slurm stay.
set -euo pipefail

STATE_DIR=/run/diffcleanse-slurm
STATE_FILE=$STATE_DIR/started

say() { echo "[slurm-down] $*"; }
die() { echo "[slurm-down] ERROR: $*" >&2; exit 1; }

case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) die "unknown argument: $1 (see --help)" ;;
esac
[[ $(id -u) -eq 0 ]] || die "must run as root"

if [[ ! -f "$STATE_FILE" ]]; then
  say "no $STATE_FILE: slurm-up.sh started nothing that is still recorded; nothing to stop"
  exit 0
fi

recorded_pid() {  # PID recorded for $1 if that process is still alive and still $1
  local name=$1 pid
  pid=$(awk -v n="$name" '$1 == n {print $2}' "$STATE_FILE" | tail -n 1)
  [[ -n "$pid" ]] || return 0
  if kill -0 "$pid" 2>/dev/null && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name"* ]]; then
    echo "$pid"
  fi
}

stop_pid() {  # stop process $2 (named $1): SIGTERM, wait up to 20 s, then SIGKILL
  local name=$1 pid=$2
  say "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 200); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  say "$name (pid $pid) did not exit after 20 s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
}

# Cancel what is still queued or running on the cluster we are about to stop.
if [[ -n "$(recorded_pid slurmctld)" ]]; then
  jobs=$(timeout 10 squeue -h -t PENDING,RUNNING,SUSPENDED,COMPLETING -o %i 2>/dev/null || true)
  if [[ -n "$jobs" ]]; then
    say "cancelling jobs still in the queue: $(echo "$jobs" | tr '\n' ' ')"
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs || true
    for _ in $(seq 1 50); do
      left=$(timeout 10 squeue -h -t PENDING,RUNNING,SUSPENDED,COMPLETING -o %i 2>/dev/null || true)
      [[ -z "$left" ]] && break
      sleep 0.2
    done
  fi
fi

slurmd_ours=0
for name in slurmd slurmctld slurmdbd mariadbd munged; do
  if ! grep -q "^$name " "$STATE_FILE"; then
    continue
  fi
  pid=$(recorded_pid "$name")
  if [[ -z "$pid" ]]; then
    say "$name: recorded but no longer running"
    continue
  fi
  if [[ $name == slurmd ]]; then slurmd_ours=1; fi
  stop_pid "$name" "$pid"
done

# Job steps (slurmstepd) are children of our slurmd; none should be left after scancel.
if [[ $slurmd_ours -eq 1 ]]; then
  for pid in $(pgrep -x slurmstepd || true); do
    stop_pid slurmstepd "$pid"
  done
fi

rm -f "$STATE_FILE"
rmdir "$STATE_DIR" 2>/dev/null || true
say "done; removed $STATE_FILE"
