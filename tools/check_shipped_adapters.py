#!/usr/bin/env python3
"""Checks that every shipped adapter loads in peft and in diffusers and that both apply it alike.

For each adapter folder (models/teachers/*, models/grpo_mix*, models/gpu_base/...), over its base
transformer (a diffusers SD3Transformer2DModel folder):

* peft: ``PeftModel.from_pretrained(transformer, dir)`` with every warning recorded (a config key
  peft does not know warns ``Unexpected keyword arguments``);
* diffusers: ``StableDiffusion3Pipeline.lora_state_dict(dir, return_lora_metadata=True)`` (which
  picks ``pytorch_lora_weights.safetensors``) + ``load_lora_into_transformer`` on a fresh copy;
* one forward on fixed random inputs: relative L2 between the two outputs (must be <= 1e-4) and
  between the adapted and the base output (the adapter does something).

With ``--old DIR`` it also checks that the tensors equal, bit for bit, those of the same folder
under DIR (the files before a rewrite). Run: ``python tools/check_shipped_adapters.py``.
"""

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from peft import PeftModel
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
GROUPS = [
    ("models/world_base/transformer", ["models/teachers/*", "models/grpo_mix", "models/grpo_mix_no_kl"]),
    ("models/world_base_gpu/transformer", ["models/gpu_base/teachers/*", "models/gpu_base/grpo_mix"]),
]


def inputs(t: SD3Transformer2DModel) -> dict:
    g = torch.Generator().manual_seed(0)
    c = t.config
    return dict(
        hidden_states=torch.randn(2, c.in_channels, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(2, 7, c.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g),
        timestep=torch.tensor([250.0, 750.0]),
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", type=Path)
    args = parser.parse_args()
    failed = False
    print("| adapter | peft warnings | diffusers vs peft (rel. L2) | adapted vs base (rel. L2) | tensors unchanged |")
    print("|---|---|---|---|---|")
    for base_dir, patterns in GROUPS:
        base = SD3Transformer2DModel.from_pretrained(ROOT / base_dir).eval()
        x = inputs(base)
        with torch.no_grad():
            y_base = base(**x).sample
        for pattern in patterns:
            for d in sorted(ROOT.glob(pattern)):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    pm = PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
                peft_warnings = [str(w.message) for w in caught if "peft" in (w.filename or "") or "Unexpected" in str(w.message)]
                t = copy.deepcopy(base)
                sd, meta = StableDiffusion3Pipeline.lora_state_dict(d, return_lora_metadata=True)
                StableDiffusion3Pipeline.load_lora_into_transformer(sd, transformer=t, metadata=meta)
                with torch.no_grad():
                    y_peft = pm(**x).sample
                    y_diff = t.eval()(**x).sample
                err, moved = rel(y_diff, y_peft), rel(y_peft, y_base)
                same = "-"
                if args.old:
                    old = load_file(args.old / d.relative_to(ROOT) / "adapter_model.safetensors")
                    new = load_file(d / "adapter_model.safetensors")
                    same = "yes" if old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old) else "NO"
                ok = err <= 1e-4 and moved > 1e-4 and not peft_warnings and same != "NO"
                failed |= not ok
                print(f"| {d.relative_to(ROOT)} | {len(peft_warnings)} {peft_warnings[:1]} | {err:.1e} | {moved:.1e} | {same} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
