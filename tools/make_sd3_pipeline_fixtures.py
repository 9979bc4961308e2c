#!/usr/bin/env python3
"""A tiny random SD3.5-style diffusers pipeline folder and diffusers' own 4-step output on it,
for tests/suite/sd3_pipeline.rs.

Completes `tests/fixtures/sd3_tiny/` (whose text encoders / tokenizers come from
`make_sd3_text_fixtures.py` and whose `vae/` comes from `make_sd3_vae_fixtures.py`; those
subfolders are read, never rewritten) with:

* `transformer/`: diffusers' `SD3Transformer2DModel`, SD3.5 style (RMSNorm qk-norm, dual
  attention in blocks 0 and 1 of 3), 2 heads of 16 dims, in/out channels = the VAE's 16 latent
  channels, joint_attention_dim = the tiny T5's d_model (88), pooled_projection_dim = the two
  CLIP projections concatenated (32 + 40 = 72), sample_size 16 latent pixels (= 64x64 images
  with the VAE's factor 4), pos_embed_max_size 12 (so a 8x8-patch image is a centre crop).
  Every parameter and the pos-embed table are re-drawn with a fixed seed (norm scales
  1 + N(0, 0.1^2), biases N(0, 0.1^2), matrices N(0, 1/fan_in)), then rounded to float16,
  the stored precision (the file is half the size);
* `scheduler/scheduler_config.json`: `FlowMatchEulerDiscreteScheduler`, shift 3.0 (as SD3.5);
* `model_index.json`: `StableDiffusion3Pipeline` naming all nine components.

Then loads the folder with `StableDiffusion3Pipeline.from_pretrained` (CPU, float32) and runs it
with a fixed initial `latents` tensor for two prompts (one non-ASCII), 4 steps, guidance 4.5,
`max_sequence_length` = the text fixtures' T5 length (32), once with `output_type="latent"` and
once with `output_type="np"`, and writes `tests/fixtures/sd3_pipeline/reference.safetensors`:

* `initial_latents` [2, 16, 16, 16]: the noise handed to the pipeline;
* `final_latents`   [2, 16, 16, 16]: the pipeline's latents after 4 Euler steps (scaled space);
* `images`          [2, 64, 64, 3]: the decoded images in [0, 1] (float32, NHWC, before u8);
* `sigmas` [5], `timesteps` [4]: the scheduler's schedule for the run;

and `tests/fixtures/sd3_pipeline/reference.json` with the settings.
"""

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "sd3_tiny"
REF = ROOT / "tests" / "fixtures" / "sd3_pipeline"

PROMPTS = ["a photo of a cat sitting on a red sofa", "café au lait on a wooden table — ümlaut"]
STEPS = 4
GUIDANCE = 4.5
SHIFT = 3.0
HEIGHT = WIDTH = 64
LATENT_SEED = 2026


def t5_max_length() -> int:
    return json.loads((ROOT / "tests" / "fixtures" / "sd3_text" / "reference.json").read_text())[
        "t5_max_sequence_length"
    ]


def transformer_config() -> dict:
    vae = json.loads((TINY / "vae" / "config.json").read_text())
    t5 = json.loads((TINY / "text_encoder_3" / "config.json").read_text())
    clip_l = json.loads((TINY / "text_encoder" / "config.json").read_text())
    clip_g = json.loads((TINY / "text_encoder_2" / "config.json").read_text())
    return dict(
        sample_size=16,
        patch_size=2,
        in_channels=vae["latent_channels"],
        out_channels=vae["latent_channels"],
        num_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5["d_model"],
        caption_projection_dim=32,
        pooled_projection_dim=clip_l["projection_dim"] + clip_g["projection_dim"],
        pos_embed_max_size=12,
        qk_norm="rms_norm",
        dual_attention_layers=(0, 1),
    )


def rerandomise_(model: SD3Transformer2DModel, seed: int) -> None:
    """Every parameter and the pos-embed table re-drawn (norms included), then float16-rounded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(".bias"):
                new = 0.1 * torch.randn(p.shape, generator=g)
            elif p.dim() == 1:
                assert "norm" in name, f"unexpected 1-d parameter {name}"
                new = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            else:
                new = torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:]))
            p.copy_(new.half().float())
        pe = model.pos_embed.pos_embed
        pe.copy_((0.5 * torch.randn(pe.shape, generator=g)).half().float())


def write_folder() -> None:
    for sub in ["text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3", "vae"]:
        assert (TINY / sub).is_dir(), f"{TINY / sub} missing: run make_sd3_text_fixtures.py / make_sd3_vae_fixtures.py"
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**transformer_config())
    rerandomise_(model, 4242)
    if (TINY / "transformer").exists():
        shutil.rmtree(TINY / "transformer")
    model.to(torch.float16).save_pretrained(TINY / "transformer", safe_serialization=True)

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    if (TINY / "scheduler").exists():
        shutil.rmtree(TINY / "scheduler")
    scheduler.save_pretrained(TINY / "scheduler")

    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (TINY / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def main() -> int:
    torch.use_deterministic_algorithms(True)
    write_folder()
    pipe = StableDiffusion3Pipeline.from_pretrained(TINY, torch_dtype=torch.float32).to("cpu")
    assert pipe.vae_scale_factor == 4 and pipe.default_sample_size * pipe.vae_scale_factor == HEIGHT
    t5_len = t5_max_length()

    channels = pipe.transformer.config.in_channels
    g = torch.Generator().manual_seed(LATENT_SEED)
    initial = torch.randn(len(PROMPTS), channels, HEIGHT // 4, WIDTH // 4, generator=g)

    common = dict(
        prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=HEIGHT, width=WIDTH,
        max_sequence_length=t5_len,
    )
    with torch.no_grad():
        final = pipe(**common, latents=initial.clone(), output_type="latent").images
        sigmas = pipe.scheduler.sigmas.clone()
        timesteps = pipe.scheduler.timesteps.clone()
        images = pipe(**common, latents=initial.clone(), output_type="np").images
    images = torch.from_numpy(np.ascontiguousarray(images)).float()
    assert final.shape == initial.shape and images.shape == (len(PROMPTS), HEIGHT, WIDTH, 3), images.shape
    # The run moved the latents and the two prompts differ.
    assert (final - initial).abs().mean() > 0.1
    assert (images[0] - images[1]).abs().mean() > 1e-3

    REF.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "initial_latents": initial.contiguous(),
            "final_latents": final.float().contiguous(),
            "images": images.contiguous(),
            "sigmas": sigmas.float().contiguous(),
            "timesteps": timesteps.float().contiguous(),
        },
        str(REF / "reference.safetensors"),
        metadata={"format": "pt"},
    )
    settings = dict(
        prompts=PROMPTS, negative_prompt="", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
        height=HEIGHT, width=WIDTH, max_sequence_length=t5_len, shift=SHIFT, latent_seed=LATENT_SEED,
    )
    (REF / "reference.json").write_text(json.dumps(settings, ensure_ascii=False, indent=2) + "\n")
    added = [TINY / "transformer", TINY / "scheduler", TINY / "model_index.json", REF]
    size = sum(f.stat().st_size for p in added for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    print(f"wrote {TINY} (transformer, scheduler, model_index.json) and {REF}: {size / 1e6:.3f} MB")
    print("sigmas", sigmas.tolist(), "timesteps", timesteps.tolist())
    print("final latents std", final.std().item(), "images mean", images.mean().item())
    return 0


if __name__ == "__main__":
    sys.exit(main())
