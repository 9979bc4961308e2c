#!/usr/bin/env python3
"""Mean seconds per training iteration of each stage in a run's metrics.jsonl.

Each adapter-training record carries `seconds` (time since its stage began); the mean over the
last iterations (after the first two, which include warm-up) is printed per stage.

    python3 tools/iteration_seconds.py runs/bench_iterations/metrics.jsonl
"""

import json
import sys
from collections import defaultdict


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    stages = defaultdict(list)
    with open(sys.argv[1]) as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"{sys.argv[1]}:{number}: not JSON ({e})")
            if "seconds" in record and "step" in record:
                stages[record.get("stage", "?")].append((record["step"], record["seconds"]))
    if not stages:
        sys.exit(f"{sys.argv[1]}: no record with `seconds`")
    for stage, points in stages.items():
        points.sort()
        if len(points) < 4:
            print(f"{stage}: only {len(points)} iterations")
            continue
        (s0, t0), (s1, t1) = points[1], points[-1]
        print(f"{stage}: {(t1 - t0) / (s1 - s0):.3f} s per iteration (mean of iterations {s0 + 1}-{s1})")


if __name__ == "__main__":
    main()
