#!/usr/bin/env bash
# slurm-up.sh: install and start a single-node SLURM cluster on this machine, for testing the
# workflow's SLURM profile (profiles/slurm-cpu-test, tests/test_slurm.py) without a real cluster.
#
# Usage (as root, on Debian/Ubuntu without systemd; every daemon is started by hand):
#   bash scripts/slurm-up.sh                 # fast path: no accounting (sacct does not work;
#                                            # the test profile uses slurm-status-command: squeue)
#   bash scripts/slurm-up.sh --accounting    # also MariaDB + slurmdbd, so sacct works and the
#                                            # SLURM executor plugin runs with its defaults
#   bash scripts/slurm-up.sh --timeout 120   # seconds to wait for the node to become idle (60)
#   bash scripts/slurm-down.sh               # stops exactly what this script started
#
# What it does:
#   1. apt-get installs munge slurmctld slurmd slurm-client (plus slurmdbd mariadb-server with
#      --accounting), skipped when already installed.
#   2. Writes /etc/slurm/slurm.conf (and /etc/slurm/slurmdbd.conf): one node `localhost`
#      (NodeAddr 127.0.0.1, CPUs=$(nproc), RealMemory = 80 % of MemTotal), one default partition
#      `local`, daemons bound to loopback only, MinJobAge=300 (needed by the squeue status path).
#   3. Starts munged, [mariadbd, slurmdbd,] slurmctld and `slurmd -N localhost`, each only when
#      it is not already running, and records every daemon it started (name and PID) in
#      /run/diffcleanse-slurm/started. A daemon that was already running and not started by this
#      script (for example a munged someone else runs) is used but not recorded, so
#      slurm-down.sh leaves it alone.
#   4. Waits until `sinfo` shows the node idle.
# Idempotent: running it again starts nothing new (it restarts its own slurmctld/slurmd only
# when slurm.conf changed, for example when switching --accounting on).
# Logs: /var/log/slurm/{slurmctld,slurmd,slurmdbd}.log, /var/log/munge/munged.log,
#       /var/log/mysql/diffcleanse-mariadb.log.
set -euo pipefail

STATE_DIR=/run/diffcleanse-slurm
STATE_FILE=$STATE_DIR/started
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
MARKER="# diffcleanse-slurm: written by scripts/slurm-up.sh"
ACCOUNTING=0
TIMEOUT=60

say() { echo "[slurm-up] $*"; }
die() { echo "[slurm-up] ERROR: $*" >&2; exit 1; }

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --accounting) ACCOUNTING=1 ;;
    --timeout) TIMEOUT="${2:?--timeout needs a number of seconds}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"
T0=$(date +%s)

# ---------------------------------------------------------------- state file helpers
# One line per daemon this script started: "<name> <pid>".
mkdir -p "$STATE_DIR"
touch "$STATE_FILE"

state_pid() {  # print the recorded PID of daemon $1 if it is still that daemon, else nothing
  local name=$1 pid
  pid=$(awk -v n="$name" '$1 == n {print $2}' "$STATE_FILE" | tail -n 1)
  [[ -n "$pid" ]] || return 0
  if kill -0 "$pid" 2>/dev/null && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name"* ]]; then
    echo "$pid"
  fi
}

record() {  # record daemon $1 with PID $2 (replacing an older line for that name)
  local name=$1 pid=$2 tmp
  tmp=$(mktemp "$STATE_DIR/.started.XXXXXX")
  awk -v n="$name" '$1 != n' "$STATE_FILE" > "$tmp"
  echo "$name $pid" >> "$tmp"
  mv "$tmp" "$STATE_FILE"
}

forget() {
  local name=$1 tmp
  tmp=$(mktemp "$STATE_DIR/.started.XXXXXX")
  awk -v n="$name" '$1 != n' "$STATE_FILE" > "$tmp"
  mv "$tmp" "$STATE_FILE"
}

foreign_pid() {  # PID of a running $1 that this script did not start, else nothing
  local name=$1 ours
  ours=$(state_pid "$name")
  pgrep -x "$name" | grep -vx "${ours:-none}" | head -n 1 || true
}

wait_pidfile() {  # wait for pidfile $1 to name a live process; print the PID
  local f=$1 pid
  for _ in $(seq 1 100); do
    if [[ -s "$f" ]]; then
      pid=$(tr -dc '0-9' < "$f")
      if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; return 0; fi
    fi
    sleep 0.1
  done
  return 1
}

stop_ours() {  # stop daemon $1 if this script started it
  local name=$1 pid
  pid=$(state_pid "$name")
  [[ -n "$pid" ]] || return 0
  say "stopping $name (pid $pid) to restart it with the new configuration"
  kill -TERM "$pid"
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
  forget "$name"
}

# ---------------------------------------------------------------- 1. packages
PKGS=(munge slurmctld slurmd slurm-client)
if [[ $ACCOUNTING -eq 1 ]]; then PKGS+=(slurmdbd mariadb-server); fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  say "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" > /tmp/diffcleanse-slurm-apt.log \
    || { tail -n 30 /tmp/diffcleanse-slurm-apt.log >&2; die "apt-get install failed (see above)"; }
  say "installed (the package scripts' 'policy-rc.d denied' messages are expected: no systemd)"
else
  say "packages already installed: ${PKGS[*]}"
fi

# ---------------------------------------------------------------- 2. configuration
NCPU=$(nproc)
MEM_KB=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
REAL_MEM=$(( MEM_KB * 8 / 10 / 1024 ))
if [[ $ACCOUNTING -eq 1 ]]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none"
fi

install -d -m 0755 "$LOG_DIR" "$RUN_DIR" /var/spool/slurmctld /var/spool/slurmd /etc/slurm
NEW_CONF=$(mktemp)
cat > "$NEW_CONF" <<EOF
$MARKER; rewritten on every run.
# Single node, loopback only. See /var/log/slurm/*.log when something does not start.
ClusterName=diffcleanse
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$ACCT_LINES
ReturnToService=2
# Finished jobs stay visible to squeue/scontrol for 300 s: the Snakemake SLURM plugin's
# 'squeue' status command needs MinJobAge >= 3 x slurm-init-seconds-before-status-checks.
MinJobAge=300
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$NCPU RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

CONF_CHANGED=0
if [[ -f "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
  backup="$CONF.bak.$(date +%Y%m%d%H%M%S)"
  say "an existing $CONF was not written by this script: moving it to $backup"
  mv "$CONF" "$backup"
fi
if [[ -f "$CONF" ]] && cmp -s "$NEW_CONF" "$CONF"; then
  rm -f "$NEW_CONF"
  say "$CONF unchanged (node localhost: CPUs=$NCPU RealMemory=${REAL_MEM}MB)"
else
  if [[ -f "$CONF" ]]; then CONF_CHANGED=1; fi
  install -m 0644 "$NEW_CONF" "$CONF"
  rm -f "$NEW_CONF"
  say "wrote $CONF (node localhost: CPUs=$NCPU RealMemory=${REAL_MEM}MB," \
    "accounting: $([[ $ACCOUNTING -eq 1 ]] && echo slurmdbd || echo none))"
fi

# ---------------------------------------------------------------- 3a. munge
if [[ -n "$(state_pid munged)" ]]; then
  say "munged already running (pid $(state_pid munged), started by this script)"
elif [[ -n "$(foreign_pid munged)" ]]; then
  say "munged already running (pid $(foreign_pid munged)), not started by this script: using it, will leave it"
else
  forget munged
  install -d -o munge -g munge -m 0755 /run/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
  fi
  say "starting munged"
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged
  pid=$(wait_pidfile /run/munge/munged.pid) || die "munged did not start: see /var/log/munge/munged.log"
  record munged "$pid"
  say "munged started (pid $pid)"
fi
munge -n | unmunge > /dev/null || die "munge -n | unmunge failed: see /var/log/munge/munged.log"

# ---------------------------------------------------------------- 3b. accounting (optional)
if [[ $ACCOUNTING -eq 1 ]]; then
  # MariaDB without networking (socket /run/mysqld/mysqld.sock only).
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  install -d -o mysql -g adm -m 0750 /var/log/mysql
  if [[ -n "$(state_pid mariadbd)" ]]; then
    say "mariadbd already running (pid $(state_pid mariadbd), started by this script)"
  elif [[ -n "$(foreign_pid mariadbd)" ]]; then
    say "mariadbd already running (pid $(foreign_pid mariadbd)), not started by this script: using it, will leave it"
  else
    forget mariadbd
    if [[ ! -d /var/lib/mysql/mysql ]]; then
      say "initialising the MariaDB data directory"
      mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db > /dev/null
    fi
    say "starting mariadbd (--skip-networking)"
    rm -f /run/mysqld/mysqld.pid
    setsid /usr/sbin/mariadbd --user=mysql --skip-networking \
      --pid-file=/run/mysqld/mysqld.pid --socket=/run/mysqld/mysqld.sock \
      --log-error=/var/log/mysql/diffcleanse-mariadb.log < /dev/null > /dev/null 2>&1 &
    pid=$(wait_pidfile /run/mysqld/mysqld.pid) \
      || die "mariadbd did not start: see /var/log/mysql/diffcleanse-mariadb.log"
    record mariadbd "$pid"
    say "mariadbd started (pid $pid)"
  fi
  for _ in $(seq 1 100); do mariadb-admin ping > /dev/null 2>&1 && break; sleep 0.2; done
  mariadb-admin ping > /dev/null 2>&1 || die "MariaDB does not answer: see /var/log/mysql/diffcleanse-mariadb.log"

  if [[ -f "$DBD_CONF" ]] && grep -q '^StoragePass=' "$DBD_CONF"; then
    DB_PASS=$(sed -n 's/^StoragePass=//p' "$DBD_CONF")
  else
    DB_PASS=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
  fi
  mariadb <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
  umask_old=$(umask); umask 077
  cat > "$DBD_CONF" <<EOF
$MARKER; rewritten on every run.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
CommunicationParameters=NoInAddrAny
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$DB_PASS
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$RUN_DIR/slurmdbd.pid
EOF
  umask "$umask_old"
  chmod 0600 "$DBD_CONF"

  if [[ -n "$(state_pid slurmdbd)" ]]; then
    say "slurmdbd already running (pid $(state_pid slurmdbd), started by this script)"
  elif [[ -n "$(foreign_pid slurmdbd)" ]]; then
    say "slurmdbd already running (pid $(foreign_pid slurmdbd)), not started by this script: using it, will leave it"
  else
    forget slurmdbd
    say "starting slurmdbd"
    rm -f "$RUN_DIR/slurmdbd.pid"
    /usr/sbin/slurmdbd
    pid=$(wait_pidfile "$RUN_DIR/slurmdbd.pid") || die "slurmdbd did not start: see $LOG_DIR/slurmdbd.log"
    record slurmdbd "$pid"
    say "slurmdbd started (pid $pid)"
  fi
  for _ in $(seq 1 100); do sacctmgr -n list cluster > /dev/null 2>&1 && break; sleep 0.2; done
  sacctmgr -n list cluster > /dev/null 2>&1 || die "slurmdbd does not answer: see $LOG_DIR/slurmdbd.log"
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx diffcleanse; then
    say "registering cluster 'diffcleanse' in the accounting database"
    sacctmgr -i add cluster diffcleanse > /dev/null
  fi
fi

# ---------------------------------------------------------------- 3c. slurmctld, slurmd
if [[ $ACCOUNTING -eq 0 ]]; then
  for d in slurmdbd mariadbd; do
    if [[ -n "$(state_pid "$d")" ]]; then
      say "note: $d from an earlier --accounting run is still running (unused now; slurm-down.sh stops it)"
    fi
  done
fi

if [[ $CONF_CHANGED -eq 1 ]]; then
  # 'scontrol reconfigure' does not apply a change of AccountingStorageType: restart.
  stop_ours slurmd
  stop_ours slurmctld
fi

if [[ -n "$(state_pid slurmctld)" ]]; then
  say "slurmctld already running (pid $(state_pid slurmctld), started by this script)"
elif [[ -n "$(foreign_pid slurmctld)" ]]; then
  say "slurmctld already running (pid $(foreign_pid slurmctld)), not started by this script: using it, will leave it"
  if [[ $CONF_CHANGED -eq 1 ]]; then
    say "WARNING: $CONF changed but that slurmctld was not restarted"
  fi
else
  forget slurmctld
  say "starting slurmctld"
  rm -f "$RUN_DIR/slurmctld.pid"
  /usr/sbin/slurmctld
  pid=$(wait_pidfile "$RUN_DIR/slurmctld.pid") || die "slurmctld did not start: see $LOG_DIR/slurmctld.log"
  record slurmctld "$pid"
  say "slurmctld started (pid $pid)"
fi

if [[ -n "$(state_pid slurmd)" ]]; then
  say "slurmd already running (pid $(state_pid slurmd), started by this script)"
elif [[ -n "$(foreign_pid slurmd)" ]]; then
  say "slurmd already running (pid $(foreign_pid slurmd)), not started by this script: using it, will leave it"
else
  forget slurmd
  say "starting slurmd -N localhost"
  rm -f "$RUN_DIR/slurmd.pid"
  /usr/sbin/slurmd -N localhost
  pid=$(wait_pidfile "$RUN_DIR/slurmd.pid") || die "slurmd did not start: see $LOG_DIR/slurmd.log"
  record slurmd "$pid"
  say "slurmd started (pid $pid)"
fi

# ---------------------------------------------------------------- 4. wait for the node
say "waiting up to ${TIMEOUT}s for node localhost to be idle"
deadline=$(( $(date +%s) + TIMEOUT ))
state=""
while :; do
  state=$(timeout 10 sinfo -h -N -n localhost -o %T 2>/dev/null | head -n 1 || true)
  case "$state" in
    idle|mixed|allocated|completing) break ;;
    drained|draining|down|down\*|drained\*)
      scontrol update nodename=localhost state=resume > /dev/null 2>&1 || true ;;
  esac
  if [[ $(date +%s) -ge $deadline ]]; then
    echo "[slurm-up] ERROR: node localhost is not idle after ${TIMEOUT}s (state: '${state:-no answer}')." >&2
    echo "[slurm-up] Look at $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log" \
      "(and /var/log/munge/munged.log); last lines:" >&2
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"; do
      if [[ -f "$f" ]]; then echo "--- $f" >&2; tail -n 15 "$f" >&2; fi
    done
    exit 1
  fi
  sleep 0.5
done

say "node localhost is $state; daemons started by this script (in $STATE_FILE):"
sed 's/^/[slurm-up]   /' "$STATE_FILE"
sinfo
say "up in $(( $(date +%s) - T0 ))s; stop with: bash scripts/slurm-down.sh"
