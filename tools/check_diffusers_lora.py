#!/usr/bin/env python3
"""A flow-opd adapter in diffusers' SD3 pipeline, for tests/suite/sd3_lora.rs.

1. Makes a LoRA on the tiny SD3.5 folder's transformer (`tests/fixtures/sd3_tiny`) with peft
   (Flow-GRPO targets, r 4, alpha 8, lora_B drawn N(0, 0.2^2), seed 7), saves it with peft's
   `save_pretrained`, and rewrites it with `flow-opd lora convert --to both` (flow-opd's own
   writer, the folder every flow-opd stage saves) into `tests/fixtures/sd3_lora/adapter/`.
2. Runs `StableDiffusion3Pipeline.from_pretrained(tiny)` + `load_lora_weights(adapter)` (which
   reads `pytorch_lora_weights.safetensors` and its `lora_adapter_metadata`) with the prompts,
   initial latents, steps, CFG and T5 length of `tests/fixtures/sd3_pipeline/` and writes
   `tests/fixtures/sd3_lora/reference.safetensors`: `final_latents` and `images` (NHWC, [0, 1]).

Needs the venv of tools/requirements.txt and a release build of flow-opd
(`FLOW_OPD=target/release/flow-opd` by default).
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "sd3_tiny"
REF = ROOT / "tests" / "fixtures" / "sd3_pipeline"
OUT = ROOT / "tests" / "fixtures" / "sd3_lora"
TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


def main() -> int:
    torch.use_deterministic_algorithms(True)
    flow_opd = os.environ.get("FLOW_OPD", str(ROOT / "target" / "release" / "flow-opd"))
    settings = json.loads((REF / "reference.json").read_text())
    initial = load_file(REF / "reference.safetensors")["initial_latents"]

    transformer = SD3Transformer2DModel.from_pretrained(TINY / "transformer", torch_dtype=torch.float32)
    pm = get_peft_model(transformer, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)
        subprocess.run([flow_opd, "lora", "convert", tmp, str(OUT / "adapter"), "--to", "both"], check=True)

    pipe = StableDiffusion3Pipeline.from_pretrained(TINY, torch_dtype=torch.float32).to("cpu")
    common = dict(
        prompt=settings["prompts"], num_inference_steps=settings["num_inference_steps"],
        guidance_scale=settings["guidance_scale"], height=settings["height"], width=settings["width"],
        max_sequence_length=settings["max_sequence_length"],
    )
    with torch.no_grad():
        plain = pipe(**common, latents=initial.clone(), output_type="np").images
        pipe.load_lora_weights(OUT / "adapter")
        final = pipe(**common, latents=initial.clone(), output_type="latent").images
        images = pipe(**common, latents=initial.clone(), output_type="np").images
    moved = float(np.linalg.norm(images - plain) / np.linalg.norm(plain))
    print(f"adapted vs plain pipeline images: relative L2 {moved:.3e}")
    assert moved > 1e-3, "the adapter must change the images"
    save_file(
        {"final_latents": final.float().contiguous(), "images": torch.from_numpy(np.ascontiguousarray(images)).float()},
        str(OUT / "reference.safetensors"),
        metadata={"format": "pt"},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
