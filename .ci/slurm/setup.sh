#!/bin/bash
# A real single-node SLURM (Debian's slurm-wlm 22.05) with accounting (sacct), for the tier in
# tests_slurm/: munge, MariaDB, slurmdbd, slurmctld, slurmd, each started by hand in the background
# (no systemd needed). Idempotent: a daemon whose recorded PID still runs is left alone.
#
#   sudo .ci/slurm/setup.sh    # install what is missing (apt-get), configure, start, smoke-test
#   .ci/slurm/stop.sh          # cancel every job, stop what setup.sh started (by recorded PID)
#
# Exit code 3: SLURM cannot be installed here (not root, or no apt-get); 1: it failed to come up.
# Settings (environment): SLOTS (default 8: the node offers that many CPUs, whatever the machine
# has, so that many one-CPU jobs run at once; the jobs are tiny and niced), MEM_MB (RealMemory,
# default 16000), JOB_NICE (default 19: slurmd runs under `nice -n JOB_NICE` and every job
# inherits it, so the jobs never compete with other work), SMOKE (default 1: srun, sbatch, sacct).
# PIDs go to /run/slurm-local/*.pid, logs to /var/log/slurm-local/, state to /var/spool/slurm*.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CLUSTER=local
MEM_MB=${MEM_MB:-16000}
SLOTS=${SLOTS:-8}
JOB_NICE=${JOB_NICE:-19}
SMOKE=${SMOKE:-1}
RUN=/run/slurm-local
LOG=/var/log/slurm-local
START=$(date +%s)
say() { echo "[setup $(( $(date +%s) - START ))s] $*"; }

[ "$(id -u)" = 0 ] || { echo "setup: SLURM needs root to install and start; not root here" >&2; exit 3; }
command -v apt-get >/dev/null || { echo "setup: no apt-get here (Debian or Ubuntu needed)" >&2; exit 3; }

# --- 1. packages ----------------------------------------------------------------------------------
PACKAGES="slurmctld slurmd slurm-client slurmdbd munge mariadb-server"
missing=$(for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
    say "installing: $missing"
    export DEBIAN_FRONTEND=noninteractive
    { nice -n 19 apt-get update -q && nice -n 19 apt-get install -y -q $missing; } || \
        { echo "setup: apt-get could not install $missing" >&2; exit 3; }
fi

mkdir -p $RUN $LOG /etc/slurm /var/spool/slurmctld /var/spool/slurmd

# running NAME: whether the PID recorded in $RUN/NAME.pid is alive
running() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }
# wait_for SECONDS WHAT COMMAND...: retry COMMAND once a second
wait_for() {
    local limit=$1 what=$2; shift 2
    for _ in $(seq "$limit"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
    echo "setup: $what did not come up within ${limit}s; see $LOG" >&2; exit 1
}

# --- 2. munge ------------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
    say "creating the munge key"
    /usr/sbin/mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null || \
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown munge:munge /etc/munge /etc/munge/munge.key && chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge && chmod 755 /run/munge
if ! running munged; then
    say "starting munged"
    # setpriv execs munged as user munge (no wrapper process), so $! is munged itself
    setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F >>$LOG/munged.out 2>&1 &
    echo $! > $RUN/munged.pid
fi
wait_for 30 munged sh -c 'munge -n | unmunge'

# --- 3. MariaDB and the accounting database --------------------------------------------------------
mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
if [ ! -d /var/lib/mysql/mysql ]; then
    say "initialising MariaDB's data folder"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>$LOG/mariadb.out 2>&1
fi
if ! running mariadb; then
    say "starting mariadbd"
    /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
        --pid-file=/run/mysqld/mysqld.pid --bind-address=127.0.0.1 \
        --innodb-buffer-pool-size=128M >>$LOG/mariadb.out 2>&1 &
    echo $! > $RUN/mariadb.pid
fi
wait_for 60 mariadbd mariadb-admin --socket=/run/mysqld/mysqld.sock ping

# The database password: kept from an earlier slurmdbd.conf, else a new one.
DBPASS=$(sed -n 's/^StoragePass=//p' /etc/slurm/slurmdbd.conf 2>/dev/null || true)
[ -n "$DBPASS" ] || DBPASS=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
mariadb --socket=/run/mysqld/mysqld.sock <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL

# --- 4. configuration ------------------------------------------------------------------------------
HOST=$(hostname -s)
sed -e "s|@HOST@|$HOST|g" -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@RUN@|$RUN|g" -e "s|@MEM@|$MEM_MB|g" \
    -e "s|@SLOTS@|$SLOTS|g" "$HERE/slurm.conf.in" > /etc/slurm/slurm.conf
sed -e "s|@RUN@|$RUN|g" -e "s|@DBPASS@|$DBPASS|g" "$HERE/slurmdbd.conf.in" > /etc/slurm/slurmdbd.conf
chown root:root /etc/slurm/slurmdbd.conf && chmod 600 /etc/slurm/slurmdbd.conf
chmod 644 /etc/slurm/slurm.conf
# slurmd refuses to start without cgroup.conf on some builds even with proctrack/linuxproc
[ -f /etc/slurm/cgroup.conf ] || echo "CgroupPlugin=autodetect" > /etc/slurm/cgroup.conf

# --- 5. slurmdbd, the cluster and its associations --------------------------------------------------
if ! running slurmdbd; then
    say "starting slurmdbd"
    /usr/sbin/slurmdbd -D >>$LOG/slurmdbd.out 2>&1 &
    echo $! > $RUN/slurmdbd.pid
fi
wait_for 60 slurmdbd sacctmgr -n list cluster
sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER"
sacctmgr -n list account format=account | grep -qw default || \
    sacctmgr -i add account default Cluster="$CLUSTER" Description=default Organization=local
sacctmgr -n list user format=user | grep -qw root || sacctmgr -i add user root Account=default
sacctmgr -n list assoc format=cluster,account,user | grep -q "$CLUSTER.*default.*root" || \
    sacctmgr -i add user root Account=default Cluster="$CLUSTER"

# --- 6. slurmctld and slurmd -------------------------------------------------------------------------
if running slurmctld; then
    scontrol reconfigure   # the configuration rendered above
else
    say "starting slurmctld"
    /usr/sbin/slurmctld -D -i >>$LOG/slurmctld.out 2>&1 &
    echo $! > $RUN/slurmctld.pid
fi
wait_for 60 slurmctld scontrol ping
if ! running slurmd; then
    say "starting slurmd (nice $JOB_NICE: its jobs inherit it)"
    nice -n "$JOB_NICE" /usr/sbin/slurmd -D >>$LOG/slurmd.out 2>&1 &
    echo $! > $RUN/slurmd.pid
fi
node_ready() { sinfo -h -n "$HOST" -o %t | grep -Eq '^(idle|mix|alloc)'; }
for _ in $(seq 60); do node_ready && break; sleep 1; done
if ! node_ready; then   # a node left down or drained by an earlier run of the cluster
    scontrol update nodename="$HOST" state=resume 2>/dev/null || true
    wait_for 60 "node $HOST" node_ready
fi
say "SLURM is up: $(sinfo --version)"
sinfo

# --- 7. smoke test -------------------------------------------------------------------------------------
if [ "$SMOKE" = 1 ]; then
    say "srun hostname: $(srun -t 1 hostname)"
    id=$(sbatch --parsable -t 2 -o /tmp/slurm-local-smoke-%j.out --wrap 'nice; sleep 5')
    say "sbatch --wrap 'sleep 5': job $id"
    while squeue -h -j "$id" 2>/dev/null | grep -q .; do sleep 1; done
    for _ in $(seq 30); do   # the job's end reaches slurmdbd a moment later
        sacct -n -X -j "$id" -o state | grep -q COMPLETED && break; sleep 1
    done
    sacct -j "$id" -o jobid,jobname,state,exitcode,elapsed
    say "job's nice value: $(cat /tmp/slurm-local-smoke-$id.out)"
    sacct -n -X -j "$id" -o state | grep -q COMPLETED || { echo "setup: sacct does not show job $id COMPLETED" >&2; exit 1; }
fi
say "done"
