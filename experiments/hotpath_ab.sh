#!/usr/bin/env bash
# Before/after of the multi-vector hot path, alternating A (BEFORE_SRC: another checkout's src/, e.g. main's)
# and B (this checkout's src/) on one index, phases only (experiments/hotpath_profile.py, HOTPATH_QUICK=1).
# Usage: BEFORE_SRC=/path/to/main/src bash experiments/hotpath_ab.sh INDEX DATA [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
INDEX=$1 DATA=$2 ROUNDS=${3:-2}
for round in $(seq "$ROUNDS"); do
  for side in A B; do
    if [ "$side" = A ]; then SRC=$BEFORE_SRC; else SRC=$PWD/src; fi
    echo "== round $round side $side $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
    HOTPATH_QUICK=1 PYTHONPATH="$SRC:$PWD" python -m experiments.hotpath_profile "$INDEX" "$DATA" 20 \
      "hierarchical:candidates=500" "hierarchical" 2>&1 | grep -v "^ "
  done
done
