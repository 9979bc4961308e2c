#!/usr/bin/env bash
# One-shot GPU benchmark of flow-opd against PyTorch + diffusers, for a lent H100 / H200, at
# SD3.5-Medium size (tools/configs/sd35_medium.json), 512 px (64 x 64 latents), 333 text tokens
# (77 CLIP + 256 T5). In one session, one after the other:
#
#   1. the card (nvidia-smi) and versions -> gpu.txt
#   2. torch: diffusers SD3Transformer2DModel in bf16 (SDPA attention), forward and a peft LoRA
#      (r 32 / alpha 64 on the Flow-GRPO projections, f32 adapter) train step at batch $BATCH
#      -> torch_bf16.json
#   3. `flow-opd bench --device cuda` on the same config / latent / tokens, bf16 base
#      (`--weights bf16`), forward and LoRA step (`--skip-train`), at the first batch of
#      $FLOW_OPD_BATCHES that runs (the first is $BATCH) -> flow_opd_bench.json
#   4. torch again at flow-opd's batch when that is not $BATCH: the like-for-like row
#      -> torch_same_batch.json
#   5. `flow-opd bench --opd` at the paper's per-GPU load: 9 images, CFG 4.5, T = 10, LoRA r 32 /
#      alpha 64, 3 teachers + the anchor, bf16 base weights -> flow_opd_opd.txt
#   6. a summary table (images/s, peak memory, flow-opd / torch) -> summary.md
#
# Peak memory: torch's own counters (max_memory_allocated / reserved, per figure, reset before
# each), flow-opd's reserved bytes where its JSON has them, and for every step nvidia-smi's
# memory.used sampled every 250 ms (the process's whole footprint: allocator pools and CUDA
# context) -> memory.tsv. stderr of every step -> log.txt. All 8 files land flat in $OUT
# (runs/gpu_bench/ when OUT is unset).
#
# Each step runs under `timeout`, clipped so that the whole script ends by TOTAL_S seconds
# (default 500) even if a step hangs; the OPD step (about 4 minutes at 9 images) keeps at least
# OPD_MIN_S of it.
#
# Here:   cargo build --release --features cuda && strip target/release/flow-opd
#         (strip: the tree that travels to the device is limited to 64 MiB)
#         the diffusers wheel in .whl/ (tools/README.md says how)
# There:  bash tools/gpu_bench.sh     (carrying target/release/flow-opd and .whl)
#
# Knobs (environment): BIN, PY, CONFIG, BATCH, LATENT, TOKENS, RUNS, ITERATIONS, FLOW_OPD_BATCHES,
# TORCH_SAME_DTYPE, OPD_BATCH, OPD_CFG, OPD_STEPS, OPD_RANK, OPD_ALPHA, OPD_TEACHERS, OPD_WEIGHTS,
# OPD_MICRO_BATCH, OPD_ITERATIONS, TOTAL_S, OPD_MIN_S, and the two *_EXTRA_ARGS below.
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release/flow-opd}          # built with --features cuda
PY=${PY:-python3}                            # the Python with torch and peft (diffusers comes from .whl)
CONFIG=${CONFIG:-tools/configs/sd35_medium.json}
BATCH=${BATCH:-8}                            # torch bf16 batch
LATENT=${LATENT:-64}                         # 512 px
TOKENS=${TOKENS:-333}                        # 77 CLIP + 256 T5
RUNS=${RUNS:-5}                              # torch: timed iterations per figure (median)
ITERATIONS=${ITERATIONS:-3}                  # flow-opd bench: timed iterations per figure (median)
FLOW_OPD_BATCHES=${FLOW_OPD_BATCHES:-"$BATCH 4 2 1"}   # tried in order until one runs
TORCH_SAME_DTYPE=${TORCH_SAME_DTYPE:-auto}   # torch at flow-opd's batch: f32 or bf16; auto: flow-opd bench's --weights
OPD_BATCH=${OPD_BATCH:-9}
OPD_CFG=${OPD_CFG:-4.5}
OPD_STEPS=${OPD_STEPS:-10}
OPD_RANK=${OPD_RANK:-32}
OPD_ALPHA=${OPD_ALPHA:-64}
OPD_TEACHERS=${OPD_TEACHERS:-3}
OPD_WEIGHTS=${OPD_WEIGHTS:-bf16}
OPD_ITERATIONS=${OPD_ITERATIONS:-1}          # timed OPD iterations (after one warm-up)
OPD_MICRO_BATCH=${OPD_MICRO_BATCH:-9}        # samples per transformer pass (9: the whole batch, CFG doubles it)
TOTAL_S=${TOTAL_S:-500}
OPD_MIN_S=${OPD_MIN_S:-240}
# ---- Extra flow-opd flags: the plain bench runs the forward and the LoRA step over a bf16 base
# (as torch's reference); the OPD bench prints JSON and checkpoints transformer blocks (the
# lightest memory setting; "--checkpointing none" for the fastest). Set them to choose.
FLOW_OPD_BENCH_EXTRA_ARGS=${FLOW_OPD_BENCH_EXTRA_ARGS-"--weights bf16 --skip-train"}
FLOW_OPD_OPD_EXTRA_ARGS=${FLOW_OPD_OPD_EXTRA_ARGS-"--json --checkpointing blocks"}

OUT=${OUT:-runs/gpu_bench}
mkdir -p "$OUT"
rm -f "$OUT"/{gpu.txt,log.txt,memory.tsv,torch_bf16.json,flow_opd_bench.json,torch_same_batch.json,flow_opd_opd.txt,summary.md}
TMP=$(mktemp -d /tmp/gpu_bench.XXXXXX)
LOG="$OUT/log.txt"
MEM="$OUT/memory.tsv"
: > "$LOG"
printf 'step\tseconds\texit\tsmi_before_mib\tsmi_peak_mib\n' > "$MEM"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# The CUDA libraries for flow-opd only (torch brings its own).
FLOW_OPD_LIBS=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}

smi_used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1; }

# step NAME CAP RESERVE STDOUT CMD...: runs CMD with its stdout to STDOUT and stderr to the log,
# under a timeout of CAP seconds clipped to what is left of TOTAL_S once RESERVE seconds are kept
# for the later steps; records seconds, exit status and nvidia-smi's peak in memory.tsv.
# Returns CMD's status, 124 / 137 on a timeout, 125 when no time was left to start it.
step() {
    local name=$1 cap=$2 reserve=$3 stdout=$4
    shift 4
    local left=$((TOTAL_S - SECONDS - reserve))
    local limit=$((left < cap ? left : cap))
    if ((limit < 15)); then
        echo "== $name: skipped, ${left}s left of TOTAL_S=$TOTAL_S" | tee -a "$LOG"
        printf '%s\t0\tskipped\t\t\n' "$name" >> "$MEM"
        return 125
    fi
    echo "== $name (timeout ${limit}s): $*" | tee -a "$LOG"
    local before smi_pid start=$SECONDS rc peak
    before=$(smi_used)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > "$TMP/smi_$name.txt" 2>/dev/null &
    smi_pid=$!
    timeout -k 5 "$limit" "$@" > "$stdout" 2>> "$LOG"
    rc=$?
    kill "$smi_pid" 2>/dev/null
    wait "$smi_pid" 2>/dev/null
    peak=$(sort -n "$TMP/smi_$name.txt" 2>/dev/null | tail -1)
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$((SECONDS - start))" "$rc" "$before" "$peak" >> "$MEM"
    echo "== $name: exit $rc after $((SECONDS - start))s, nvidia-smi peak ${peak:-?} MiB" | tee -a "$LOG"
    if ((rc == 124 || rc == 137)); then echo "== $name: TIMED OUT" | tee -a "$LOG"; fi
    return "$rc"
}

# 1. The card.
{
    date -u
    nvidia-smi -L
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    echo "flow-opd: $(LD_LIBRARY_PATH="$FLOW_OPD_LIBS" "$BIN" --version 2>&1 | head -1)  ($BIN)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
} > "$OUT/gpu.txt" 2>&1
total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)

if [ "$TORCH_SAME_DTYPE" = auto ]; then
    TORCH_SAME_DTYPE=f32
    [[ " $FLOW_OPD_BENCH_EXTRA_ARGS " =~ \ --weights[\ =]bf16\  ]] && TORCH_SAME_DTYPE=bf16
fi
echo "flow-opd extra args: bench [$FLOW_OPD_BENCH_EXTRA_ARGS], bench --opd [$FLOW_OPD_OPD_EXTRA_ARGS]; torch at flow-opd's batch in $TORCH_SAME_DTYPE" >> "$OUT/gpu.txt"

# diffusers (not on the device image), carried as a wheel.
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c 'import torch, diffusers, peft; print("torch", torch.__version__, "diffusers", diffusers.__version__, "peft", peft.__version__)' >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

SHAPE=(--config "$CONFIG" --latent "$LATENT" --tokens "$TOKENS")
BENCH_MIN_S=60 SAME_MIN_S=30

# 2. torch bf16 at BATCH: forward + LoRA step (the full-weight step is left out).
step torch_bf16 120 $((OPD_MIN_S + BENCH_MIN_S + SAME_MIN_S)) "$TMP/torch_bf16.out" \
    "$PY" tools/bench_torch.py "${SHAPE[@]}" --batch "$BATCH" --runs "$RUNS" --device cuda --dtype bf16 \
    --skip-train --json "$OUT/torch_bf16.json"
rc_torch=$?

# 3. flow-opd bench (forward and LoRA step) at the first batch that runs.
bench_batch= rc_bench=125
for b in $FLOW_OPD_BATCHES; do
    # shellcheck disable=SC2086 # the extra args are words
    step "flow_opd_bench_b$b" 180 $((OPD_MIN_S + SAME_MIN_S)) "$TMP/flow_opd_bench.out" \
        env LD_LIBRARY_PATH="$FLOW_OPD_LIBS" "$BIN" bench "${SHAPE[@]}" --batch "$b" --iterations "$ITERATIONS" \
        --json --device cuda $FLOW_OPD_BENCH_EXTRA_ARGS
    rc_bench=$?
    ((rc_bench == 125)) && break # no time left
    bench_batch=$b
    if ((rc_bench == 0)); then
        grep '^{' "$TMP/flow_opd_bench.out" | tail -1 > "$OUT/flow_opd_bench.json"
        break
    fi
    ((rc_bench == 124 || rc_bench == 137)) && break # out of time: no smaller try
done

# 4. torch at flow-opd's batch and base precision, when flow-opd ran at another batch than torch's.
same_skip=
[ "$TORCH_SAME_DTYPE" = f32 ] || same_skip=--skip-train
[ "${bench_batch:-$BATCH}" != "$BATCH" ] && step torch_same_batch 90 "$OPD_MIN_S" "$TMP/torch_same_batch.out" \
    "$PY" tools/bench_torch.py "${SHAPE[@]}" --batch "${bench_batch:-${FLOW_OPD_BATCHES##* }}" --runs "$RUNS" \
    --device cuda --dtype "$TORCH_SAME_DTYPE" $same_skip --json "$OUT/torch_same_batch.json"
rc_same=$?

# 5. flow-opd bench --opd at the paper's per-GPU load.
# shellcheck disable=SC2086
step flow_opd_opd 600 0 "$OUT/flow_opd_opd.txt" \
    env LD_LIBRARY_PATH="$FLOW_OPD_LIBS" "$BIN" bench --opd "${SHAPE[@]}" --batch "$OPD_BATCH" --cfg "$OPD_CFG" \
    --steps "$OPD_STEPS" --rank "$OPD_RANK" --alpha "$OPD_ALPHA" --teachers "$OPD_TEACHERS" --weights "$OPD_WEIGHTS" \
    --micro-batch "$OPD_MICRO_BATCH" --iterations "$OPD_ITERATIONS" --device cuda $FLOW_OPD_OPD_EXTRA_ARGS
rc_opd=$?
cat "$OUT/flow_opd_opd.txt"

# 6. Summary (plain python3: the standard library only).
python3 - "$OUT" "$OPD_BATCH" "$OPD_MICRO_BATCH" <<'EOF' | tee "$OUT/summary.md"
import csv, json, os, re, sys

out, opd_batch, opd_micro = sys.argv[1], int(sys.argv[2]), sys.argv[3]
FIGURES = ("forward", "lora_train", "train")


def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.loads([l for l in f.read().splitlines() if l.startswith("{")][-1])
    except (OSError, ValueError, IndexError):
        return None


smi = {}
with open(os.path.join(out, "memory.tsv")) as f:
    for row in csv.DictReader(f, delimiter="\t"):
        smi[re.sub(r"_b\d+$", "", row["step"])] = row  # flow-opd bench: its last try


def num(x, digits=2):
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "-"


def gib(x):
    return num(x / 2**30, 1) if isinstance(x, (int, float)) else "-"


def smi_gib(row):
    try:
        return num(int(row["smi_peak_mib"]) / 1024, 1)
    except (KeyError, TypeError, ValueError):
        return "-"


def status(row):
    return row["exit"] if row else "not run"


def memory(r):
    """(allocated, reserved) peak bytes per figure: torch's counters, flow-opd's reserved bytes."""
    if r.get("implementation") == "flow-opd":
        m = r.get("memory") or {}
        return {}, {k: m.get(f"{k}_reserved_bytes") for k in FIGURES}
    return r.get("peak_memory_bytes") or {}, r.get("peak_memory_reserved_bytes") or {}


with open(os.path.join(out, "gpu.txt")) as f:
    gpu = f.read().splitlines()
print("card: " + next((l for l in gpu if l.startswith("GPU ")), "?"))
print("versions: " + " | ".join(l for l in gpu if l.startswith(("torch ", "flow-opd:"))))
print()
runs = [("torch", load("torch_bf16.json"), "torch_bf16"),
        ("torch", load("torch_same_batch.json"), "torch_same_batch"),
        ("flow-opd", load("flow_opd_bench.json"), "flow_opd_bench")]
print("| run | weights | batch | forward img/s | LoRA step img/s | full train step img/s "
      "| peak allocated fwd / LoRA / train GiB | peak reserved fwd / LoRA / train GiB | nvidia-smi peak GiB | exit |")
print("|---|---|---|---|---|---|---|---|---|---|")
notes = []
for label, r, step in runs:
    row = smi.get(step)
    if r is None:
        print(f"| {label} ({step}) | - | - | - | - | - | - | - | {smi_gib(row)} | {status(row)} |")
        continue
    weights = r.get("dtype") or r.get("weights") or "f32"
    allocated, reserved = memory(r)
    print(f"| {label} | {weights} | {r['batch']} | {num(r.get('forward_samples_per_s'))} "
          f"| {num(r.get('lora_train_samples_per_s'))} | {num(r.get('train_samples_per_s'))} "
          f"| {' / '.join(gib(allocated.get(k)) for k in FIGURES)} | {' / '.join(gib(reserved.get(k)) for k in FIGURES)} "
          f"| {smi_gib(row)} | {status(row)} |")
    if r.get("errors"):
        notes.append(f"{label} {weights} batch {r['batch']}: {r['errors']}")
    if r.get("checkpointing") not in (None, "none"):
        notes.append(f"{label}: checkpointing {r['checkpointing']}")
    if label == "flow-opd" and weights != "f32":
        notes.append(f"flow-opd: --weights {weights} is the forward's and LoRA step's base; its full-weight step is f32")
for line in notes:
    print(f"\n{line}")

ours = runs[2][1]
print()
for _, ref, _ in runs[:2]:
    if not (ours and ref):
        continue
    cells = []
    for key, what in (("forward_samples_per_s", "forward"), ("lora_train_samples_per_s", "LoRA step"),
                      ("train_samples_per_s", "full train step")):
        a, b = ours.get(key), ref.get(key)
        if a and b and (key != "train_samples_per_s" or ref.get("dtype") == "f32"):  # flow-opd's is f32
            cells.append(f"{what} {a / b:.2f}x")
    print(f"flow-opd (batch {ours['batch']}) / torch {ref.get('dtype')} (batch {ref['batch']}), images/s: "
          + (", ".join(cells) or "-"))

row = smi.get("flow_opd_opd")
opd = load("flow_opd_opd.txt")
if opd is None:  # the text `bench --opd` prints
    try:
        with open(os.path.join(out, "flow_opd_opd.txt")) as f:
            text = f.read()
    except OSError:
        text = ""
    grab = {k: re.search(rf"{p}:\s+([\d.]+) s", text) for k, p in
            (("rollout_s", "rollout"), ("update_s", "OPD update"))}
    reserved = re.search(r"device memory:\s+([\d.]+) GiB", text)
    if all(grab.values()):
        opd = {k: float(m.group(1)) for k, m in grab.items()}
        if reserved:
            opd["reserved_bytes"] = float(reserved.group(1)) * 2**30
print()
if opd and opd.get("rollout_s") and opd.get("update_s"):
    r, u = opd["rollout_s"], opd["update_s"]
    print(f"flow-opd bench --opd, {opd_batch} images (micro-batch {opd_micro}): rollout {r:.2f} s "
          f"({opd_batch / r:.2f} images/s), update {u:.2f} s, iteration {r + u:.2f} s "
          f"({opd_batch / (r + u):.3f} images/s); peak reserved {gib(opd.get('reserved_bytes'))} GiB, "
          f"nvidia-smi peak {smi_gib(row)} GiB")
else:
    print(f"flow-opd bench --opd: no figures (exit {status(row)}; see log.txt)")
EOF
echo "outputs in $OUT: $(ls "$OUT" | tr '\n' ' ')"
echo "exit status: torch bf16 $rc_torch, flow-opd bench $rc_bench (batch ${bench_batch:-none}), torch same batch $rc_same, flow-opd bench --opd $rc_opd"
rm -rf "$TMP"
((rc_torch == 0 && rc_bench == 0 && rc_same == 0 && rc_opd == 0))
