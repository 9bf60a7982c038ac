#!/usr/bin/env bash
# A one-node Slurm cluster on this machine (Debian's slurmctld + slurmd + munge), for trying
# `pnnh study --launcher slurm` without a real cluster and for the test suite.
#
#   bash scripts/slurm_local.sh start     # writes $PNNH_SLURM_DIR/slurm.conf, starts munged, slurmctld, slurmd
#   export SLURM_CONF=$PNNH_SLURM_DIR/slurm.conf   # (printed by start) so sbatch/squeue find the cluster
#   bash scripts/slurm_local.sh status    # sinfo
#   bash scripts/slurm_local.sh stop      # stops the three daemons it started
#
# Everything (config, munge key and socket, state, logs) lives in PNNH_SLURM_DIR
# (default /tmp/pnnh-slurm); nothing under /etc is changed. The daemons run as the calling user
# (root on the project machines) without cgroups: proctrack/linuxproc and task/none, so it works
# in containers and VMs without systemd. Ports: PNNH_SLURM_PORT (slurmctld, default 6917) and the
# next one (slurmd). Needs the Debian packages slurm-wlm and munge (scripts/setup.sh with WITH_SLURM=1).
set -euo pipefail
DIR=${PNNH_SLURM_DIR:-/tmp/pnnh-slurm}
PORT=${PNNH_SLURM_PORT:-6917}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

die() { echo "slurm_local: $*" >&2; exit 1; }

need() {
  for exe in munged slurmctld slurmd sinfo; do
    command -v "$exe" >/dev/null || [ -x "/usr/sbin/$exe" ] || die "$exe not found; install Debian's slurm-wlm and munge (WITH_SLURM=1 bash scripts/setup.sh)"
  done
}

write_conf() {
  local host cpus mem user
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  user=$(id -un)
  mkdir -p "$DIR"/{state,spool,munge,log}
  chmod 700 "$DIR/munge"
  cat > "$CONF" <<EOF
# one-node test cluster written by scripts/slurm_local.sh
ClusterName=pnnh-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=$user
SlurmdUser=$user
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MaxArraySize=10001
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  need
  if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; then
    echo "slurm_local: already running (SLURM_CONF=$CONF)"; return 0
  fi
  write_conf
  [ -f "$DIR/munge/munge.key" ] || { dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none; chmod 400 "$DIR/munge/munge.key"; }
  alive "$DIR/munge/munged.pid" || /usr/sbin/munged --force --key-file "$DIR/munge/munge.key" \
    --socket "$DIR/munge/munge.socket" --pid-file "$DIR/munge/munged.pid" --log-file "$DIR/log/munged.log" \
    --seed-file "$DIR/munge/munged.seed"
  # -i: ignore state from an earlier cluster in this directory (no stale jobs)
  alive "$DIR/slurmctld.pid" || /usr/sbin/slurmctld -i -f "$CONF"
  alive "$DIR/slurmd.pid" || /usr/sbin/slurmd -f "$CONF"
  for _ in $(seq 1 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "slurm_local: up; export SLURM_CONF=$CONF"; return 0
    fi
    sleep 0.5
  done
  echo "slurm_local: the node did not come up; logs in $DIR/log" >&2
  tail -n 20 "$DIR"/log/*.log >&2 || true
  stop; exit 1
}

stop() {
  local pidfile pid
  for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
    if alive "$pidfile"; then
      pid=$(cat "$pidfile")
      kill "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
  done
  echo "slurm_local: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  *) die "usage: $0 start|stop|status" ;;
esac
