#!/usr/bin/env bash
# The full evaluation of a model (docs/EVALUATION.md, "Results"): every cxr256 test image, all lesions-rsna images
# with opacity boxes, the oracle, the tables. Sized for the 2-core development CPU: two lanes of one torch thread
# each run side by side (on this small model two 1-thread processes finish sooner than one 2-thread process).
# Wall times go to RUN/wall_times.txt.
#
# Usage: scripts/evaluate_full.sh MODEL_DIR RUN_DIR [INDUCE_LIMIT]
#   INDUCE_LIMIT: normal test images per disease-induction prompt (default: all 300)
set -euo pipefail
M=${1:?model folder}; R=${2:?run folder}; INDUCE_LIMIT=${3:-}
D=${VALD_MD_SHARED_DATA:-../shared/data}
V=${VALD_MD:-vald-md}
mkdir -p "$R"
timed() {
    local name=$1; shift
    local t0; t0=$(date +%s)
    "$@"
    echo "$name $(( $(date +%s) - t0 )) s" | tee -a "$R/wall_times.txt"
}
limit=(); [ -n "$INDUCE_LIMIT" ] && limit=(--limit "$INDUCE_LIMIT")
lane_a() {
    timed healthy "$V" evaluate generate --model "$M" --data "$D/cxr256/labels.csv" --split test \
        --labels covid,viral_pneumonia,normal --out "$R" --threads 1
}
lane_b() {
    timed induce-covid "$V" evaluate generate --model "$M" --data "$D/cxr256/labels.csv" --split test \
        --induce "COVID 19" "${limit[@]}" --out "$R" --threads 1
    timed induce-viral "$V" evaluate generate --model "$M" --data "$D/cxr256/labels.csv" --split test \
        --induce "Viral Pneumonia" "${limit[@]}" --out "$R" --threads 1
    timed localize "$V" evaluate localize --model "$M" --data "$D/lesions-rsna" --samples 2 --n-boot 2000 \
        --out "$R/localize" --threads 1
    [ -f "$R/oracle/oracle.json" ] || timed oracle "$V" evaluate train-oracle --data "$D/cxr256/labels.csv" \
        --out "$R/oracle" --threads 1
}
lane_a > "$R/lane_a.log" 2>&1 &
a=$!
lane_b > "$R/lane_b.log" 2>&1 &
b=$!
wait "$a"; wait "$b"
timed tables "$V" evaluate tables --run "$R" --oracle "$R/oracle" --threads 2
echo "done: $R/tables/tables.md, $R/localize/summary.md, wall times in $R/wall_times.txt"
