#!/usr/bin/env python3
"""PyTorch + diffusers reference timings for `flow-opd bench` (the side-by-side benchmark).

Times, for any SD3-family transformer `config.json`, the same three workloads `flow-opd bench`
times, on the same shapes, and prints one JSON object:

* forward: `SD3Transformer2DModel(hidden_states, encoder_hidden_states, pooled_projections,
  timestep)` under `torch.inference_mode()`;
* train step (full weights): forward, loss `mean((v - x)^2)`, backward, AdamW step
  (lr 1e-4, betas 0.9 / 0.999, weight decay 1e-4), gradients zeroed;
* LoRA train step: the same with the base frozen and a peft LoRA (rank 32, alpha 64, Gaussian
  init as Flow-GRPO) on the attention projections Flow-GRPO adapts (`to_q/k/v`, `to_out.0`,
  `add_q/k/v_proj`, `to_add_out`); AdamW on the adapter only.

Inputs are random (fixed seed) with timestep 500; every figure is the median over `--runs`
timed iterations after `--warmup` untimed ones, in samples per second. float32, on the CPU,
with `torch.set_num_threads(--threads)` (default: every core, as a user gets by default).

    tools/.venv/bin/python tools/bench_torch.py --config models/world_base/transformer/config.json \
        --batch 64 --latent 16 --tokens 16

`tools/bench_compare.py` runs this and `flow-opd bench --json` on the same config and prints the
ratio table (docs/performance.md).
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a transformer config.json (diffusers layout)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--latent", type=int, default=16, help="latent side in latent pixels")
    p.add_argument("--tokens", type=int, default=24, help="text tokens")
    p.add_argument("--runs", type=int, default=5, help="timed iterations per figure (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--alpha", type=float, default=64.0)
    p.add_argument("--skip-lora", action="store_true", help="skip the LoRA step (peft not installed)")
    return p.parse_args()


def timed(fn, runs, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from diffusers import SD3Transformer2DModel
    import diffusers

    with open(args.config) as f:
        config = json.load(f)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    model = SD3Transformer2DModel.from_config(config).float()
    parameters = sum(p.numel() for p in model.parameters())
    b, s, l = args.batch, args.latent, args.tokens
    x = torch.randn(b, config["in_channels"], s, s)
    c = torch.randn(b, l, config["joint_attention_dim"])
    y = torch.randn(b, config["pooled_projection_dim"])
    t = torch.full((b,), 500.0)

    def forward():
        with torch.inference_mode():
            model(hidden_states=x, encoder_hidden_states=c, pooled_projections=y, timestep=t, return_dict=False)

    model.eval()
    forward_times = timed(forward, args.runs, args.warmup)

    def make_step(trained):
        optimizer = torch.optim.AdamW(trained, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4)

        def step():
            v = model(hidden_states=x, encoder_hidden_states=c, pooled_projections=y, timestep=t, return_dict=False)[0]
            loss = (v - x).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    model.train()
    train_times = timed(make_step(list(model.parameters())), args.runs, args.warmup)

    lora_times = None
    peft_version = None
    if not args.skip_lora:
        import peft
        from peft import LoraConfig

        peft_version = peft.__version__
        model.requires_grad_(False)
        targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                   "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
        model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.alpha, init_lora_weights="gaussian",
                                     target_modules=targets))
        trained = [p for p in model.parameters() if p.requires_grad]
        lora_times = timed(make_step(trained), args.runs, args.warmup)

    def rate(times):
        return b / statistics.median(times)

    out = {
        "implementation": "torch",
        "config": args.config,
        "batch": b,
        "latent": s,
        "tokens": l,
        "threads": torch.get_num_threads(),
        "runs": args.runs,
        "parameters": parameters,
        "forward_samples_per_s": rate(forward_times),
        "train_samples_per_s": rate(train_times),
        "lora_train_samples_per_s": rate(lora_times) if lora_times else None,
        "seconds": {"forward": forward_times, "train": train_times, "lora_train": lora_times},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "peft": peft_version,
        },
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
