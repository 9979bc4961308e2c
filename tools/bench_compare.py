#!/usr/bin/env python3
"""Side-by-side speed of flow-opd and PyTorch + diffusers on the same machine, in one run.

For each case (a transformer config.json, batch, latent side, text tokens) it runs
`flow-opd bench --json` and `tools/bench_torch.py` with the same shapes and thread count,
alternating the two `--rounds` times (so both see the same machine drift), and prints the ratio
table: samples per second of the forward, the full-weight train step (forward, backward, AdamW)
and the LoRA train step, flow-opd / torch (> 1: flow-opd faster). Each figure is the median over
the rounds of each run's median. `--json FILE` also writes every run's output.

    cargo build --release
    tools/.venv/bin/python tools/bench_compare.py            # the two cases of docs/performance.md

The default cases are the shipped world transformer at batch 64 (latent 16, 16 text tokens) and
a 6-layer, 128-wide SD3.5-style transformer (2 heads x 64, dual attention in blocks 0-2, qk
RMSNorm; `tools/configs/mmdit_6x128.json`) at batch 32 (latent 16, 24 text tokens).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = [("forward", "forward_samples_per_s"), ("train step", "train_samples_per_s"),
           ("LoRA train step", "lora_train_samples_per_s")]
DEFAULT_CASES = [
    ("models/world_base/transformer/config.json", 64, 16, 16),
    ("tools/configs/mmdit_6x128.json", 32, 16, 24),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", action="append", metavar="CONFIG:BATCH:LATENT:TOKENS",
                   help="a case to run (repeatable); default: the two cases of docs/performance.md")
    p.add_argument("--runs", type=int, default=5, help="timed iterations per figure in each run")
    p.add_argument("--rounds", type=int, default=3, help="alternating flow-opd / torch runs per case")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--flow-opd", default=os.path.join(ROOT, "target", "release", "flow-opd"))
    p.add_argument("--python", default=sys.executable, help="the Python with torch, diffusers and peft")
    p.add_argument("--json", help="write every run's JSON here")
    return p.parse_args()


def run_json(cmd, env):
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        sys.exit(f"no JSON from: {' '.join(cmd)}\n{out.stdout[-2000:]}")
    return json.loads(lines[-1])


def main():
    args = parse_args()
    if not os.path.exists(args.flow_opd):
        sys.exit(f"{args.flow_opd} not found: run `cargo build --release` first")
    cases = DEFAULT_CASES
    if args.case:
        cases = []
        for case in args.case:
            parts = case.split(":")
            if len(parts) != 4:
                sys.exit(f"--case {case!r}: expected CONFIG:BATCH:LATENT:TOKENS")
            cases.append((parts[0], int(parts[1]), int(parts[2]), int(parts[3])))
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    everything = []
    rows = []
    for config, batch, latent, tokens in cases:
        shape = ["--config", config, "--batch", str(batch), "--latent", str(latent), "--tokens", str(tokens)]
        ours, theirs = [], []
        for round_ in range(args.rounds):
            print(f"{config} batch {batch}: round {round_ + 1}/{args.rounds}", file=sys.stderr)
            ours.append(run_json([args.flow_opd, "bench", *shape, "--iterations", str(args.runs), "--json"], env))
            theirs.append(run_json([args.python, os.path.join(ROOT, "tools", "bench_torch.py"), *shape,
                                    "--runs", str(args.runs), "--threads", str(args.threads)], env))
        everything.append({"case": {"config": config, "batch": batch, "latent": latent, "tokens": tokens},
                           "flow-opd": ours, "torch": theirs})
        for name, key in FIGURES:
            a = statistics.median(r[key] for r in ours)
            b = statistics.median(r[key] for r in theirs)
            rows.append((config, batch, name, a, b, a / b))
    versions = everything[0]["torch"][0]["versions"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; threads {args.threads}; "
          f"torch {versions['torch']}, diffusers {versions['diffusers']}, peft {versions['peft']}; "
          f"medians of {args.rounds} alternating runs x {args.runs} iterations")
    print()
    print("| config | batch | figure | flow-opd samples/s | torch samples/s | flow-opd / torch |")
    print("|---|---|---|---|---|---|")
    for config, batch, name, a, b, ratio in rows:
        print(f"| `{config}` | {batch} | {name} | {a:.1f} | {b:.1f} | {ratio:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=1)


if __name__ == "__main__":
    main()
