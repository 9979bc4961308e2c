#!/usr/bin/env bash
# Wall time of recipes/world/merge_opd.toml as 1 node x 1 cpu, 1 node x 2 cpu and 2 nodes x 1 cpu
# on loopback (docs/distributed.md, "Wall time"). Run from the repository root on an otherwise
# idle machine, after `cargo build --release`; the runs go to runs/timing/.
set -euo pipefail
BIN=target/release/flow-opd
RECIPE=recipes/world/merge_opd.toml
rm -rf runs/timing
mkdir -p runs/timing
seconds() { local start=$(date +%s%N); "$@" > /dev/null 2>&1; echo $(( ($(date +%s%N) - start) / 1000000000 )); }
one=$(seconds $BIN recipe $RECIPE --runs runs/timing/one --device cpu)
two=$(seconds $BIN recipe $RECIPE --runs runs/timing/two --device cpu,cpu)
start=$(date +%s%N)
$BIN recipe $RECIPE --runs runs/timing/nodes --device cpu --nodes 2 --node-rank 0 --coordinator 127.0.0.1:29500 > runs/timing/node0.log 2>&1 &
node0=$!
$BIN recipe $RECIPE --runs runs/timing/nodes --device cpu --nodes 2 --node-rank 1 --coordinator 127.0.0.1:29500 > runs/timing/node1.log 2>&1
wait $node0
nodes=$(( ($(date +%s%N) - start) / 1000000000 ))
printf '| 1 node x 1 cpu | %d s |\n| 1 node x 2 cpu | %d s |\n| 2 nodes x 1 cpu (loopback) | %d s |\n' "$one" "$two" "$nodes"
