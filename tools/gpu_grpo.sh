#!/usr/bin/env bash
# Runs the Flow-GRPO recipes of recipes/experiments/gpu/ side by side on one GPU: the tiny world's model
# leaves most of an H200 idle with one run, so six runs of 512 samples per iteration share it
# (4.5 s per iteration each on an H200). Each recipe stops training at its `max_seconds`, then
# evaluates its adapter. Outputs go to runs/gpu/; with $OUT set (a device machine), they are
# packed into $OUT/gpu_runs.tgz, since such a machine returns only a shallow $OUT.
#
#   cargo build --release --features cuda
#   tools/gpu_grpo.sh                         # every recipe in recipes/experiments/gpu/
#   tools/gpu_grpo.sh recipes/experiments/gpu/teacher_pickscore.toml ...
#
# Needs runs/pretrain_canonical_more/base (recipes/world/pretrain_canonical.toml, then
# recipes/world/pretrain_canonical_more.toml). BIN and DEVICE override the binary and the device.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/flow-opd}
DEVICE=${DEVICE:-cuda}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
recipes=("$@")
[ ${#recipes[@]} -gt 0 ] || recipes=(recipes/experiments/gpu/*.toml)
mkdir -p runs/gpu
pids=()
for recipe in "${recipes[@]}"; do
    name=$(basename "$recipe" .toml)
    "$BIN" recipe "$recipe" --runs runs/gpu --device "$DEVICE" > "runs/gpu/$name.log" 2>&1 &
    pids+=($!)
    echo "started $recipe (log runs/gpu/$name.log)"
done
status=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "FAILED: ${recipes[$i]} (see its log)"; status=1; }
done
for table in runs/gpu/*/results.md; do
    [ -f "$table" ] && sed -n 3p "$table"
done
if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/gpu_runs.tgz" runs/gpu && echo "packed runs/gpu into $OUT/gpu_runs.tgz"
fi
exit $status
