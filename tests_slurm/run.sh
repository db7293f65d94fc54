#!/usr/bin/env bash
# The real-SLURM tier: the sweep's jobs on a real SLURM, interrupted as a cluster does (tests_slurm/).
#   sudo tests_slurm/run.sh    # Debian: installs and starts a single-node SLURM (.ci/slurm/setup.sh),
#                              # runs the tier, stops what it started; on a cluster, where sinfo
#                              # answers, it runs the tier against that cluster
# Where SLURM cannot be installed (not root, no apt-get), it says so in one line and exits 0;
# a failing scenario exits non-zero.
set -uo pipefail
cd "$(dirname "$0")/.."
started=0
if ! sinfo >/dev/null 2>&1; then
    log=$(mktemp)
    .ci/slurm/setup.sh >"$log" 2>&1
    code=$?
    if [ "$code" -eq 3 ]; then
        echo "=== SLURM TIER SKIPPED: $(tail -1 "$log"); it needs root on Debian, or a real cluster ==="
        exit 0
    elif [ "$code" -ne 0 ]; then
        cat "$log"; echo "SLURM tier: .ci/slurm/setup.sh failed (exit $code)" >&2; exit 1
    fi
    started=1
fi
python -u -m pytest -q -p no:xdist -p no:cacheprovider -s tests_slurm
status=$?
[ "$started" = 1 ] && .ci/slurm/stop.sh >/dev/null
exit "$status"
