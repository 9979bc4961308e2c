#!/usr/bin/env python3
"""Paired difference of two GRPO stages' training curves from one run's metrics.jsonl.

Stages trained with the same seed draw the same prompts and the same rollout noise (neither
depends on the policy), so their per-iteration training metrics pair up: the difference is
free of the prompts' difficulty. Prints the two curves and their difference by thirds, and
the mean difference with its standard error.

    python3 tools/paired_curves.py RUN_DIR STAGE_A STAGE_B [KEY]

KEY is a metrics.jsonl field (default `reward`; e.g. train_composition). Standard library only.
"""
import json
import statistics
import sys
from pathlib import Path


def curve(rows, stage, key):
    values = [r[key] for r in rows if r.get("stage") == f"grpo:{stage}" and key in r]
    if not values:
        stages = sorted({r["stage"] for r in rows if "stage" in r})
        sys.exit(f"no `{key}` for stage grpo:{stage} (stages: {', '.join(stages)})")
    return values


def thirds(values):
    t = max(len(values) // 3, 1)
    return " / ".join(f"{sum(values[i * t:(i + 1) * t]) / t:.3f}" for i in range(3))


def main():
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    run, a, b = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    key = sys.argv[4] if len(sys.argv) == 5 else "reward"
    path = run / "metrics.jsonl" if run.is_dir() else run
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ca, cb = curve(rows, a, key), curve(rows, b, key)
    n = min(len(ca), len(cb))
    diff = [x - y for x, y in zip(ca[:n], cb[:n])]
    se = statistics.stdev(diff) / n**0.5 if n > 1 else float("nan")
    print(f"{key} by thirds of {n} iterations")
    print(f"  {a}: {thirds(ca[:n])}")
    print(f"  {b}: {thirds(cb[:n])}")
    print(f"  {a} - {b}: {thirds(diff)}")
    print(f"mean difference {statistics.mean(diff):+.4f} +- {se:.4f} (paired standard error)")


if __name__ == "__main__":
    main()
