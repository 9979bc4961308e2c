"""Reference data for flow-opd's SD3 VAE (diffusers `AutoencoderKL`).

Writes, from the repository root:

* `tests/fixtures/sd3_tiny/vae/`: a tiny random `AutoencoderKL` with the SD3 structure
  (16 latent channels, no quant convs, SD3's scaling / shift factors, GroupNorm eps 1e-6,
  mid-block attention) saved with `save_pretrained` (config.json +
  diffusion_pytorch_model.safetensors, float16 storage to keep the file small);
* `tests/fixtures/sd3_vae/quant_conv_vae/`: a smaller SD1/SDXL-style variant with
  `use_quant_conv` / `use_post_quant_conv` and no shift, to check the optional 1x1 convs;
* `tests/fixtures/sd3_vae/reference.safetensors`: an image batch, diffusers' encoder mean /
  logvar, a noise tensor and the posterior sample it gives, the scaled latents, a batch of
  scaled latents and diffusers' decoded output of them, the decoder on the encoder's mean,
  and the quant-conv variant's encoder mean and decoder output (`quant_*`).

All tensors are computed in float32 from the float16-rounded weights the file holds, on the
CPU with fixed seeds. Only the `vae/` subfolder of `tests/fixtures/sd3_tiny/` is written.
"""

import json
import os
import shutil
import sys

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAE_DIR = os.path.join(ROOT, "tests", "fixtures", "sd3_tiny", "vae")
REF_DIR = os.path.join(ROOT, "tests", "fixtures", "sd3_vae")

SCALING = 1.5305
SHIFT = 0.0609


def randomise(vae: AutoencoderKL, seed: int) -> AutoencoderKL:
    """Re-randomises every parameter (norm scales away from 1, biases away from 0) so each one
    matters, then rounds to float16 (the stored precision)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) * (1.2 / np.sqrt(fan_in)))
            p.copy_(p.half().float())
    return vae.eval()


def build_with_quant_convs() -> AutoencoderKL:
    """An SD1/SDXL-style variant (quant convs, no shift) to check the optional 1x1 convs."""
    torch.manual_seed(3)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        scaling_factor=0.13025,
        use_quant_conv=True,
        use_post_quant_conv=True,
    )
    return randomise(vae, 5)


def build() -> AutoencoderKL:
    torch.manual_seed(20260125)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 32),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=16,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=SCALING,
        shift_factor=SHIFT,
        latents_mean=None,
        latents_std=None,
        force_upcast=True,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )
    return randomise(vae, 7)


def main() -> None:
    torch.use_deterministic_algorithms(True)
    vae = build()
    if os.path.isdir(VAE_DIR):
        shutil.rmtree(VAE_DIR)
    os.makedirs(VAE_DIR)
    vae.to(torch.float16).save_pretrained(VAE_DIR, safe_serialization=True)
    vae = AutoencoderKL.from_pretrained(VAE_DIR, torch_dtype=torch.float32).eval()

    g = torch.Generator().manual_seed(11)
    # Images in [0, 1]: a smooth pattern plus noise, so both low and high frequencies appear.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    base = torch.stack([xx, yy, 0.5 * (xx + yy)])[None].repeat(2, 1, 1, 1)
    images = (0.7 * base + 0.3 * torch.rand((2, 3, 32, 32), generator=g)).clamp(0, 1)
    noise = torch.randn((2, 16, 8, 8), generator=g)
    latents = torch.randn((2, 16, 8, 8), generator=g)

    with torch.no_grad():
        posterior = vae.encode(images * 2 - 1).latent_dist
        mean, logvar = posterior.mean, posterior.logvar
        sample = mean + torch.exp(0.5 * logvar) * noise
        scaled = (mean - SHIFT) * SCALING
        decoded = vae.decode(latents / SCALING + SHIFT).sample
        # Round trip of the encoded images (decoder on the encoder's mean).
        roundtrip = vae.decode(mean).sample

    # The variant with quant convs: moments and decoded output.
    quant_dir = os.path.join(REF_DIR, "quant_conv_vae")
    if os.path.isdir(quant_dir):
        shutil.rmtree(quant_dir)
    build_with_quant_convs().to(torch.float16).save_pretrained(quant_dir, safe_serialization=True)
    quant = AutoencoderKL.from_pretrained(quant_dir, torch_dtype=torch.float32).eval()
    quant_images = images[:, :, :16, :16].contiguous()
    quant_latents = torch.randn((2, 4, 8, 8), generator=g)
    with torch.no_grad():
        quant_mean = quant.encode(quant_images * 2 - 1).latent_dist.mean
        quant_decoded = quant.decode(quant_latents).sample

    os.makedirs(REF_DIR, exist_ok=True)
    tensors = {
        "images": images,
        "mean": mean,
        "logvar": logvar,
        "noise": noise,
        "sample": sample,
        "scaled_latents": scaled,
        "latents": latents,
        "decoded": decoded,
        "roundtrip": roundtrip,
        "quant_images": quant_images,
        "quant_mean": quant_mean,
        "quant_latents": quant_latents,
        "quant_decoded": quant_decoded,
    }
    tensors = {k: v.float().contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(REF_DIR, "reference.safetensors"))

    cfg = json.load(open(os.path.join(VAE_DIR, "config.json")))
    n_params = sum(p.numel() for p in vae.parameters())
    print(f"config: {cfg}")
    print(f"parameters: {n_params}")
    for k, v in tensors.items():
        print(f"{k:15s} {tuple(v.shape)} std {v.std():.4f} mean {v.mean():+.4f}")
    # How much each part matters (a test that ignored it would fail):
    with torch.no_grad():
        for name in ["encoder.mid_block.attentions.0.to_v.weight", "encoder.down_blocks.0.downsamplers.0.conv.weight"]:
            p = dict(vae.named_parameters())[name]
            saved = p.clone()
            p.mul_(0)
            changed = vae.encode(images * 2 - 1).latent_dist.mean
            p.copy_(saved)
            print(f"zeroing {name}: encoder mean moves by {((changed - mean).norm() / mean.norm()):.3f} (relative L2)")
    for root, _, files in os.walk(os.path.join(ROOT, "tests", "fixtures", "sd3_vae")):
        for f in files:
            print(os.path.join(root, f), os.path.getsize(os.path.join(root, f)))
    for f in os.listdir(VAE_DIR):
        print(os.path.join(VAE_DIR, f), os.path.getsize(os.path.join(VAE_DIR, f)))


if __name__ == "__main__":
    sys.exit(main())
