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
timed iterations after `--warmup` untimed ones, in samples per second. By default float32, on
the CPU, with `torch.set_num_threads(--threads)` (default: every core, as a user gets by default).

    tools/.venv/bin/python tools/bench_torch.py --config models/world_base/transformer/config.json \
        --batch 64 --latent 16 --tokens 16

`--device cuda` runs on the GPU (the timer is read after `torch.cuda.synchronize()`, and each
figure also reports the peak of `torch.cuda.max_memory_allocated` / `max_memory_reserved`, reset
before its warm-up). `--dtype bf16` stores the transformer's weights (and the inputs) in bfloat16;
attention is diffusers' default processor (`JointAttnProcessor2_0`, i.e. PyTorch SDPA); the LoRA
weights stay float32 (`--lora-dtype model` keeps peft's default, the base layer's dtype), the loss
is computed in float32. `--skip-train` leaves out the full-weight step (it does not fit a GPU at
SD3.5-Medium size in float32). SD3.5-Medium at 512 px with 77 + 256 text tokens on one GPU:

    python3 tools/bench_torch.py --config tools/configs/sd35_medium.json --batch 8 --latent 64 \
        --tokens 333 --device cuda --dtype bf16 --skip-train --json torch_bf16.json

`tools/bench_compare.py` runs this and `flow-opd bench --json` on the same config and prints the
ratio table (docs/performance.md); `tools/gpu_bench.sh` runs the GPU comparison.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import time

import torch

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


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
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="f32",
                   help="storage dtype of the transformer's weights and of the inputs")
    p.add_argument("--lora-dtype", choices=["f32", "model"], default="f32",
                   help="LoRA weights in float32 (default) or in the base layer's dtype (peft's default)")
    p.add_argument("--skip-train", action="store_true", help="skip the full-weight train step")
    p.add_argument("--skip-lora", action="store_true", help="skip the LoRA step (peft not installed)")
    p.add_argument("--json", metavar="FILE", help="also write the JSON object to FILE")
    return p.parse_args()


def timed(fn, runs, warmup, sync):
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from diffusers import SD3Transformer2DModel
    import diffusers

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and device.index is not None:
        torch.cuda.set_device(device)
    dtype = DTYPES[args.dtype]

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def fresh():
        """Frees what the previous figure left and restarts the peak-memory counters."""
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    def peaks():
        if not cuda:
            return None, None
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)

    with open(args.config) as f:
        config = json.load(f)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device(device):  # random init straight on the device (fast on a GPU)
        model = SD3Transformer2DModel.from_config(config)
    model = model.to(device)  # the buffers made on the CPU (the position table)
    model = model.float() if dtype == torch.float32 else model.bfloat16()  # `.to(dtype=)` warns
    parameters = sum(p.numel() for p in model.parameters())
    processors = sorted({type(p).__name__ for p in model.attn_processors.values()})
    b, s, l = args.batch, args.latent, args.tokens
    x = torch.randn(b, config["in_channels"], s, s).to(device=device, dtype=dtype)
    c = torch.randn(b, l, config["joint_attention_dim"]).to(device=device, dtype=dtype)
    y = torch.randn(b, config["pooled_projection_dim"]).to(device=device, dtype=dtype)
    t = torch.full((b,), 500.0, device=device)
    sync()
    model_memory = torch.cuda.memory_allocated(device) if cuda else None

    errors = {}
    peak_allocated = {}
    peak_reserved = {}

    def figure(name, fn):
        """Times `fn`; on a GPU an out-of-memory error is recorded instead of ending the run."""
        fresh()
        try:
            times = timed(fn, args.runs, args.warmup, sync)
        except OUT_OF_MEMORY as e:
            if not cuda:
                raise
            errors[name] = f"out of memory: {str(e).splitlines()[0]}"
            times = None
        peak_allocated[name], peak_reserved[name] = peaks()
        return times

    def forward():
        with torch.inference_mode():
            model(hidden_states=x, encoder_hidden_states=c, pooled_projections=y, timestep=t, return_dict=False)

    model.eval()
    forward_times = figure("forward", forward)

    def make_step(trained):
        optimizer = torch.optim.AdamW(trained, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4)

        def step():
            v = model(hidden_states=x, encoder_hidden_states=c, pooled_projections=y, timestep=t, return_dict=False)[0]
            loss = (v.float() - x.float()).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    model.train()
    train_times = None
    if not args.skip_train:
        train_times = figure("train", make_step(list(model.parameters())))

    lora_times = None
    lora_dtype = None
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
        if args.lora_dtype == "f32":
            # peft puts the adapter in its base layer's dtype; upcast it as PeftModel's
            # autocast_adapter_dtype does (its forward casts the input to the adapter's dtype and
            # the result back to the base layer's).
            for module_name, module in model.named_modules():
                for name, p in list(module.named_parameters(recurse=False)):
                    if "lora_" in f"{module_name}.{name}" and p.dtype != torch.float32:
                        setattr(module, name, torch.nn.Parameter(p.detach().float(), requires_grad=p.requires_grad))
        trained = [p for p in model.parameters() if p.requires_grad]
        lora_dtype = sorted({str(p.dtype).removeprefix("torch.") for p in trained})
        lora_times = figure("lora_train", make_step(trained))
        del trained

    def rate(times):
        return b / statistics.median(times) if times else None

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
        "lora_train_samples_per_s": rate(lora_times),
        "seconds": {"forward": forward_times, "train": train_times, "lora_train": lora_times},
        "device": str(device),
        "dtype": args.dtype,
        "lora_dtype": lora_dtype,
        "attention_processors": processors,
        # Per figure, from its warm-up on; None on the CPU or for a skipped figure.
        "peak_memory_bytes": {k: peak_allocated.get(k) for k in ("forward", "train", "lora_train")},
        "peak_memory_reserved_bytes": {k: peak_reserved.get(k) for k in ("forward", "train", "lora_train")},
        "model_memory_bytes": model_memory,
        "errors": errors or None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "peft": peft_version,
        },
    }
    if cuda:
        out["gpu"] = torch.cuda.get_device_name(device)
        out["versions"]["cuda"] = torch.version.cuda
    text = json.dumps(out)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
