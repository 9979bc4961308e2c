#!/usr/bin/env python3
"""Reference values for the DiffusionNFT objective and its rollout solver, written here from the
DiffusionNFT paper's equations (Zheng et al., ICLR 2026) and its public SD3 training settings,
in float64 torch with autograd. The Rust tests (tests/suite/nft.rs) compare against them.

Regenerate (from the repository root, with the venv of tools/requirements.txt)::

    tools/.venv/bin/python tools/make_nft_fixtures.py

Output, under ``tests/fixtures/nft/``:

``loss.safetensors``
    Per case ``k`` (inputs float32, ``[N, C, H, W]`` = ``[3, 4, 6, 6]``): ``case{k}.x0`` (clean
    latents), ``.noise``, ``.t`` (``[N]`` noise levels), ``.v`` (the policy's velocity),
    ``.v_old`` (the old policy's), ``.v_ref`` (the base's), ``.advantage`` (``[N]``, before the
    clip), ``.settings`` (``[4]``: beta, kl_weight, adv_clip_max, has_ref); outputs in float64:
    ``.loss`` (``[1]``), ``.positive`` and ``.negative`` (``[N]``, the per-sample losses),
    ``.grad_v`` (d loss / d v).
``solver.safetensors``
    ``x_init`` ``[2, 4, 6, 6]`` and, for a linear velocity field ``v(x, s) = x A(s) + b(s)``
    (see ``linear_field``), the final latents of ``euler`` and ``dpm2`` with 10 steps on the
    shift-3 schedule of ``tests/fixtures/flow/schedule.json`` (diffusers' sigmas), in float64.

The objective, per sample with ``x_t = (1 - t) x0 + t eps``:

* ``r = clamp(clip(A, -m, m) / m / 2 + 1/2, 0, 1)`` with ``m = adv_clip_max``;
* positive velocity ``v+ = beta v + (1 - beta) sg(v_old)``, implicit negative
  ``v- = (1 + beta) sg(v_old) - beta v``;
* ``x0± = x_t - t v±``; adaptive weights ``w± = sg(mean |x0± - x0|)`` floored at 1e-5;
* ``L± = mean((x0± - x0)^2) / w±``;
* ``loss = m mean_N(r L+ / beta + (1 - r) L- / beta) + kl_weight mean_N(mean((v - v_ref)^2))``.
"""

import json
import math
import pathlib

import torch
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "nft"


def nft_loss(x0, noise, t, v, v_old, v_ref, advantage, beta, kl_weight, m):
    t4 = t.view(-1, 1, 1, 1)
    xt = (1 - t4) * x0 + t4 * noise
    a = advantage.clamp(-m, m)
    r = (a / m / 2 + 0.5).clamp(0, 1)
    v_old = v_old.detach()
    pos = beta * v + (1 - beta) * v_old
    neg = (1 + beta) * v_old - beta * v
    dims = (1, 2, 3)
    x0_pos = xt - t4 * pos
    x0_neg = xt - t4 * neg
    w_pos = (x0_pos - x0).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5).detach()
    w_neg = (x0_neg - x0).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5).detach()
    l_pos = ((x0_pos - x0) ** 2 / w_pos).mean(dim=dims)
    l_neg = ((x0_neg - x0) ** 2 / w_neg).mean(dim=dims)
    loss = m * (r * l_pos / beta + (1 - r) * l_neg / beta).mean()
    if v_ref is not None:
        loss = loss + kl_weight * ((v - v_ref.detach()) ** 2).mean(dim=dims).mean()
    return loss, l_pos, l_neg


def sd3_sigmas(steps, shift=3.0):
    # diffusers' FlowMatchEulerDiscreteScheduler sigmas, as tools/make_flow_fixtures.py wrote them.
    cases = json.loads((OUT.parent / "flow" / "schedule.json").read_text())["cases"]
    return next(c["sigmas"] for c in cases if c["shift"] == shift and c["steps"] == steps)


def linear_field(x, s):
    # A smooth, non-trivial field: each channel scaled and shifted by its own function of s.
    c = x.shape[1]
    k = torch.arange(c, dtype=torch.float64).view(1, c, 1, 1)
    scale = torch.cos(1.3 * s + 0.4 * k) - 0.5
    offset = 0.3 * torch.sin(2.0 * s + k)
    return x * scale + offset


def euler(x, sigmas):
    for i in range(len(sigmas) - 1):
        x = x + linear_field(x, sigmas[i]) * (sigmas[i + 1] - sigmas[i])
    return x


def dpm2(x, sigmas):
    # Multistep DPM-Solver++(2M), data prediction, alpha = 1 - s, sigma = s; the first step and
    # the last (into s = 0) are noise-free DDIM steps, as DiffusionNFT's sampler takes them.
    steps = len(sigmas) - 1
    # lambda(1) = -inf (alpha = 0): the step after it has r = inf, so D1 = 0 (first order).
    lam = lambda s: -math.inf if s >= 1 else math.log((1 - s) / s)
    prev = None
    for i in range(steps):
        s, nxt = sigmas[i], sigmas[i + 1]
        v = linear_field(x, s)
        x0 = x - s * v
        if i == 0 or i == steps - 1:
            eps = (x - (1 - s) * x0) / s
            x = (1 - nxt) * x0 + nxt * eps
        else:
            h = lam(nxt) - lam(s)
            r = (lam(s) - lam(sigmas[i - 1])) / h
            d0, d1 = x0, (x0 - prev) / r if math.isfinite(r) else torch.zeros_like(x0)
            x = (nxt / s) * x + (1 - nxt) * (1 - math.exp(-h)) * (d0 + 0.5 * d1)
        prev = x0
    return x


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(20260)
    shape = (3, 4, 6, 6)
    tensors = {}
    cases = [
        # beta, kl_weight, adv_clip_max, with a reference
        (1.0, 1e-4, 5.0, True),
        (0.1, 0.0, 5.0, False),
        (0.5, 0.3, 2.0, True),
    ]
    for k, (beta, kl_weight, m, has_ref) in enumerate(cases):
        rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).float().double()
        x0, noise = rand(*shape), rand(*shape)
        t = torch.tensor([0.9, 0.45, 0.12], dtype=torch.float64).float().double()
        v = rand(*shape).requires_grad_(True)
        v_old = (v.detach() + 0.1 * rand(*shape)).float().double()
        v_ref = rand(*shape)
        # One advantage beyond the clip on each side of zero.
        advantage = torch.tensor([7.5, -0.8, -6.0], dtype=torch.float64)
        loss, l_pos, l_neg = nft_loss(x0, noise, t, v, v_old, v_ref if has_ref else None, advantage, beta, kl_weight, m)
        (grad_v,) = torch.autograd.grad(loss, v)
        p = f"case{k}."
        for name, value in [("x0", x0), ("noise", noise), ("t", t), ("v", v.detach()), ("v_old", v_old), ("v_ref", v_ref), ("advantage", advantage)]:
            tensors[p + name] = value.float().contiguous()
        tensors[p + "settings"] = torch.tensor([beta, kl_weight, m, float(has_ref)], dtype=torch.float32)
        tensors[p + "loss"] = loss.detach().reshape(1)
        tensors[p + "positive"] = l_pos.detach()
        tensors[p + "negative"] = l_neg.detach()
        tensors[p + "grad_v"] = grad_v.contiguous()
        print(f"case {k}: loss {loss.item():.6f}, |grad| {grad_v.norm().item():.6f}")
    save_file(tensors, str(OUT / "loss.safetensors"))

    sigmas = sd3_sigmas(10)
    x_init = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64).float().double()
    save_file(
        {
            "x_init": x_init.float().contiguous(),
            "sigmas": torch.tensor(sigmas, dtype=torch.float64),
            "euler": euler(x_init, sigmas).contiguous(),
            "dpm2": dpm2(x_init, sigmas).contiguous(),
        },
        str(OUT / "solver.safetensors"),
    )
    print("wrote", OUT)


if __name__ == "__main__":
    main()
