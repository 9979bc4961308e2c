#!/usr/bin/env python3
"""Generate the flow-matching / SDE-step / LoRA reference fixtures used by the Rust tests.

Regenerate (from the repository root)::

    python3 -m venv tools/.venv \
      && tools/.venv/bin/pip install -r tools/requirements.txt \
      && tools/.venv/bin/python tools/make_flow_fixtures.py

It needs the tiny SD3.5 model written by ``tools/make_mmdit_fixtures.py``
(``tests/fixtures/mmdit/sd35_tiny/``) and its input case
``tests/fixtures/mmdit/cases/sd35_b2_nonsquare.inputs.safetensors``; it does not rewrite them.
Everything runs on the CPU, in float32 for the network and float64 for the SDE formulas, with
fixed seeds, so re-running gives bit-identical files on the same machine / torch build.

Output, all under ``tests/fixtures/flow/``:

``schedule.json``
    diffusers ``FlowMatchEulerDiscreteScheduler(shift=...)`` after ``set_timesteps(N)``:
    ``{"cases": [{"shift", "steps", "sigmas" (N+1, final 0), "timesteps" (N)}]}``, the float32
    values written as (exact) float64 numbers.
``sde_step.safetensors`` + ``sde_step.json``
    one SDE transition per case (Flow-GRPO 'sde' and 'cps' types, docs/reference.md section 3),
    computed in float64 numpy from the formulas (an implementation written here, not imported).
    Inputs ``case{k}.x``, ``case{k}.v``, ``case{k}.eps``, ``case{k}.x_next_given`` are float32
    ``[2,4,8,8]``; outputs ``case{k}.mean``, ``.sample``, ``.log_prob`` ``[2]``,
    ``.log_prob_given`` ``[2]``, ``.std_dev_t`` ``[1]`` in float32 and, with the suffix
    ``_f64``, in float64 (computed from the float32 inputs and float32 sigmas upcast).
    The json lists the cases (``k, type, a, step_index, sigma, sigma_next, ...``) and, for the
    'sde' cases, the Flow-OPD KL weights ``kl_weight_sum`` / ``kl_weight_mean``; the script checks
    them against the exact Gaussian KL and a Monte-Carlo estimate.
``lora_a/``, ``lora_b/``, ``lora_ff/``
    PEFT ``save_pretrained`` adapters (``adapter_model.safetensors`` + ``adapter_config.json``) on
    ``sd35_tiny``: ``lora_a`` / ``lora_b`` with the Flow-GRPO target list, r=4, alpha=8;
    ``lora_ff`` r=2, alpha=2, also targeting the feed-forward linears.  All ``lora_B`` are random
    (non-zero) so every adapter changes the output.
``lora_a_diffusers/pytorch_lora_weights.safetensors``
    ``lora_a`` written by diffusers' ``StableDiffusion3Pipeline.save_lora_weights`` (keys
    ``transformer.transformer_blocks.{i}...``), with the ``lora_adapter_metadata`` header entry
    that diffusers' own training scripts write (``_collate_lora_metadata``).
``lora_a_diffusers_nometa/pytorch_lora_weights.safetensors``
    the same tensors written without that metadata: diffusers then assumes lora_alpha = r
    (scale 1 instead of alpha/r = 2); expected output ``lora_a_nometa_diffusers``.
``lora_expected.safetensors``
    ``sample [B,C,H,W]`` f32 outputs of ``sd35_tiny`` on the mmdit case ``sd35_b2_nonsquare``:
    ``base``, ``lora_a``, ``lora_b``, ``lora_ff``, ``mixed`` (row 0 with lora_a, row 1 with
    lora_b), ``merged_exact`` (W + 0.5 (dW_a + dW_b), dW = alpha/r B A), ``merged_ab_avg``
    (W + alpha/r ((B_a+B_b)/2) ((A_a+A_b)/2)), ``merged_weighted`` (W + 0.25 dW_a + 0.75 dW_b),
    ``lora_a_nometa_diffusers``.  Merged weights are folded in float64 and rounded to float32.
``lora.json``
    names of the adapted linears per adapter, scales, and what each expected output is.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file, save_file

import diffusers
import peft
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.training_utils import _collate_lora_metadata
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "flow"
MMDIT = ROOT / "tests" / "fixtures" / "mmdit"
BASE_MODEL = MMDIT / "sd35_tiny"
INPUT_CASE = MMDIT / "cases" / "sd35_b2_nonsquare.inputs.safetensors"
# What adapter_config.json records as the base model (a repository-relative path, so the file
# does not depend on where the repository is checked out).
BASE_MODEL_NAME = "tests/fixtures/mmdit/sd35_tiny"

# --------------------------------------------------------------------------------------
# 1. Schedule
# --------------------------------------------------------------------------------------

SCHEDULE_CASES = [(3.0, n) for n in (1, 2, 10, 28, 40)] + [(1.0, 10)]


def schedule(shift: float, steps: int) -> tuple[list[float], list[float]]:
    """diffusers' sigmas (N+1, final 0) and timesteps (N), float32 values as Python floats."""
    sch = FlowMatchEulerDiscreteScheduler(shift=shift)  # num_train_timesteps=1000 (default)
    sch.set_timesteps(steps)
    assert sch.sigmas.dtype == torch.float32 and sch.sigmas.shape == (steps + 1,)
    assert sch.timesteps.dtype == torch.float32 and sch.timesteps.shape == (steps,)
    return [float(x) for x in sch.sigmas.tolist()], [float(x) for x in sch.timesteps.tolist()]


def shift_map(s: np.ndarray, shift: float) -> np.ndarray:
    return shift * s / (1.0 + (shift - 1.0) * s)


def write_schedule() -> dict[tuple[float, int], list[float]]:
    cases, out = [], {}
    for shift, n in SCHEDULE_CASES:
        sigmas, timesteps = schedule(shift, n)
        # Cross-check against docs/reference.md section 2, evaluated in float64.
        s_min = shift_map(np.float64(0.001), shift)
        t = np.linspace(1000.0, 1000.0 * s_min, n)
        ref = shift_map(t / 1000.0, shift)
        assert np.allclose(sigmas[:-1], ref, rtol=2e-6, atol=1e-7), (shift, n)
        assert sigmas[-1] == 0.0 and sigmas[0] == 1.0
        assert np.allclose(timesteps, 1000.0 * np.array(sigmas[:-1]), rtol=1e-6), (shift, n)
        if shift == 3.0 and n >= 2:  # N = 1 gives [1, 0]
            assert abs(sigmas[-2] - 0.0089286) < 1e-6, sigmas[-2]
        cases.append({"shift": shift, "steps": n, "sigmas": sigmas, "timesteps": timesteps})
        out[(shift, n)] = sigmas
    (OUT / "schedule.json").write_text(json.dumps({"cases": cases}, indent=1) + "\n")
    s10 = out[(3.0, 10)]
    print("schedule: shift 3, N=10 sigmas " + ", ".join(f"{x:.5f}" for x in s10))
    return out


# --------------------------------------------------------------------------------------
# 2. SDE step (docs/reference.md section 3), float64 numpy
# --------------------------------------------------------------------------------------

LOG_SQRT_2PI = math.log(math.sqrt(2.0 * math.pi))


def sde_params(sigmas: list[float], i: int, a: float) -> dict:
    s, s_next = float(sigmas[i]), float(sigmas[i + 1])
    d = s_next - s
    s_tilde = float(sigmas[1]) if s == 1.0 else s
    sigma_t = a * math.sqrt(s / (1.0 - s_tilde))
    return dict(s=s, s_next=s_next, d=d, s_tilde=s_tilde, sigma_t=sigma_t, std=sigma_t * math.sqrt(-d))


def sde_mean(x: np.ndarray, v: np.ndarray, p: dict) -> np.ndarray:
    s, d, st = p["s"], p["d"], p["sigma_t"]
    return x * (1.0 + st**2 / (2.0 * s) * d) + v * (1.0 + st**2 * (1.0 - s) / (2.0 * s)) * d


def sde_log_prob(x_next: np.ndarray, mean: np.ndarray, std: float) -> np.ndarray:
    """Per-sample mean over all non-batch elements (docs/reference.md: a mean, not a sum)."""
    lp = -((x_next - mean) ** 2) / (2.0 * std**2) - math.log(std) - LOG_SQRT_2PI
    return lp.reshape(lp.shape[0], -1).mean(axis=1)


def cps_params(sigmas: list[float], i: int, a: float) -> dict:
    s, s_next = float(sigmas[i]), float(sigmas[i + 1])
    return dict(s=s, s_next=s_next, d=s_next - s, st=s_next * math.sin(a * math.pi / 2.0))


def cps_mean(x: np.ndarray, v: np.ndarray, p: dict) -> np.ndarray:
    s, sn, st = p["s"], p["s_next"], p["st"]
    x0_hat = x - s * v
    x1_hat = x + (1.0 - s) * v
    return (1.0 - sn) * x0_hat + math.sqrt(sn**2 - st**2) * x1_hat


def cps_log_prob(x_next: np.ndarray, mean: np.ndarray) -> np.ndarray:
    lp = -((x_next - mean) ** 2)
    return lp.reshape(lp.shape[0], -1).mean(axis=1)


def kl_weights(p: dict) -> tuple[float, float]:
    s, d, st = p["s"], p["d"], p["sigma_t"]
    inner = (st * (1.0 - s) / (2.0 * s) + 1.0 / st) ** 2
    return (-d) / 2.0 * inner, d**2 / 2.0 * inner


def check_kl_weight(p: dict, w_sum: float, w_mean: float, rng: np.random.Generator, label: str) -> None:
    """KL(N(mu_s, var I) || N(mu_t, var I)), var = sigma_t^2 (-d), must be w_sum ||v_s - v_t||^2."""
    shape = (2, 4, 8, 8)
    x = rng.standard_normal(shape)
    v_s, v_t = rng.standard_normal(shape), rng.standard_normal(shape)
    mu_s, mu_t = sde_mean(x, v_s, p), sde_mean(x, v_t, p)
    var = p["std"] ** 2
    n = int(np.prod(shape[1:]))
    # general diagonal-Gaussian KL (trace, Mahalanobis and log-det terms), per sample
    kl = 0.5 * ((var / var + (mu_t - mu_s) ** 2 / var - 1.0 + np.log(var / var))
                .reshape(2, -1).sum(axis=1))
    dv2 = ((v_s - v_t) ** 2).reshape(2, -1).sum(axis=1)
    pred = w_sum * dv2
    assert np.allclose(kl, pred, rtol=1e-12), (label, kl, pred)
    # public 'mean' convention: mean over elements of (mu_s - mu_t)^2 / (2 sigma_t^2)
    kl_mean = (((mu_s - mu_t) ** 2) / (2.0 * p["sigma_t"] ** 2)).reshape(2, -1).mean(axis=1)
    assert np.allclose(kl_mean, w_mean * dv2 / n, rtol=1e-12), (label, kl_mean)
    # Monte-Carlo estimate with samples from the student, via the log-prob (sum over elements)
    m = 4000
    eps = rng.standard_normal((m,) + shape[1:])
    mc = []
    for b in range(2):
        xs = mu_s[b] + p["std"] * eps
        lp_s = sde_log_prob(xs, np.broadcast_to(mu_s[b], xs.shape), p["std"]) * n
        lp_t = sde_log_prob(xs, np.broadcast_to(mu_t[b], xs.shape), p["std"]) * n
        mc.append((lp_s - lp_t).mean())
    mc = np.array(mc)
    tol = 5.0 * np.sqrt(2.0 * kl / m)  # std of the estimator is sqrt(2 KL / m)
    assert np.all(np.abs(mc - kl) < tol), (label, mc, kl, tol)
    print(f"  KL check {label}: KL {kl[0]:.6g}, {kl[1]:.6g} = w_sum*||dv||^2 "
          f"(rel err {np.max(np.abs(kl - pred) / kl):.1e}); Monte-Carlo {mc[0]:.6g}, {mc[1]:.6g}")


# (type, step index, noise level)
SDE_CASES = ([("sde", i, a) for a in (0.7, 1.0) for i in (0, 1, 4, 8, 9)]
             + [("cps", i, 0.7) for i in (0, 4, 8)])


def f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.astype(np.float32))


def write_sde_step(sigmas: list[float]) -> None:
    tensors: dict[str, np.ndarray] = {}
    cases = []
    kl_rng = np.random.default_rng(777)
    print("sde_step (shift 3, N=10):")
    for k, (typ, i, a) in enumerate(SDE_CASES):
        rng = np.random.default_rng(1000 + k)
        shape = (2, 4, 8, 8)
        # float32 inputs, upcast exactly to float64
        x = rng.standard_normal(shape, dtype=np.float32).astype(np.float64)
        v = rng.standard_normal(shape, dtype=np.float32).astype(np.float64)
        eps = rng.standard_normal(shape, dtype=np.float32).astype(np.float64)
        pert = rng.standard_normal(shape, dtype=np.float32).astype(np.float64)
        entry = {"k": k, "type": typ, "a": a, "step_index": i, "steps": 10, "shift": 3.0,
                 "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "d": sigmas[i + 1] - sigmas[i]}
        if typ == "sde":
            p = sde_params(sigmas, i, a)
            mean = sde_mean(x, v, p)
            std = p["std"]
            sample = mean + std * eps
            # another sample (as if stored from a rollout) re-evaluated under this mean / std
            x_given = (sample + 0.5 * std * pert).astype(np.float32).astype(np.float64)
            lp = sde_log_prob(sample, mean, std)
            lp_given = sde_log_prob(x_given, mean, std)
            std_dev_t = p["sigma_t"]
            w_sum, w_mean = kl_weights(p)
            check_kl_weight(p, w_sum, w_mean, kl_rng, f"case{k}")
            entry.update(sigma_tilde=p["s_tilde"], sigma_t=p["sigma_t"], std=std,
                         kl_weight_sum=w_sum, kl_weight_mean=w_mean)
            # log-prob of the drawn sample depends only on eps and std:
            ref = (-0.5 * eps**2).reshape(2, -1).mean(axis=1) - math.log(std) - LOG_SQRT_2PI
            assert np.allclose(lp, ref, rtol=1e-12)
            if i == 0:
                assert p["s"] == 1.0 and p["s_tilde"] == sigmas[1]
            if i == 9:
                assert p["s_next"] == 0.0 and abs(p["d"] + p["s"]) == 0.0
        else:
            p = cps_params(sigmas, i, a)
            mean = cps_mean(x, v, p)
            std = p["st"]
            sample = mean + std * eps
            x_given = (sample + 0.5 * std * pert).astype(np.float32).astype(np.float64)
            lp = cps_log_prob(sample, mean)
            lp_given = cps_log_prob(x_given, mean)
            std_dev_t = p["st"]
            entry.update(st=p["st"], std=std)
        assert np.all(np.isfinite(mean)) and np.all(np.isfinite(lp)) and np.all(np.isfinite(lp_given))
        assert not np.allclose(lp, lp_given)
        pre = f"case{k}."
        tensors[pre + "x"] = f32(x)
        tensors[pre + "v"] = f32(v)
        tensors[pre + "eps"] = f32(eps)
        tensors[pre + "x_next_given"] = f32(x_given)
        for name, val in (("mean", mean), ("sample", sample), ("log_prob", lp),
                          ("log_prob_given", lp_given), ("std_dev_t", np.array([std_dev_t]))):
            tensors[pre + name] = f32(val)
            tensors[pre + name + "_f64"] = np.ascontiguousarray(val.astype(np.float64))
        entry["std_dev_t"] = std_dev_t
        cases.append(entry)
        print(f"  case{k}: {typ} a={a} i={i} s={sigmas[i]:.5f} s'={sigmas[i + 1]:.5f} "
              f"std_dev_t={std_dev_t:.6g} std={std:.6g} log_prob={lp} log_prob_given={lp_given}")
    np_save_file(tensors, str(OUT / "sde_step.safetensors"), metadata={"format": "np"})
    doc = {
        "note": ("float64 reference from docs/reference.md section 3; inputs x, v, eps, x_next_given are "
                 "float32; sigmas are the float32 diffusers values (shift 3, N=10) upcast; "
                 "log_prob is the per-sample mean over C,H,W; 'sde': sample = mean + sigma_t*sqrt(-d)*eps, "
                 "std_dev_t = sigma_t; 'cps': sample = mean + st*eps, std_dev_t = st, "
                 "log_prob = -mean((x'-mean)^2). kl_weight_sum = (-d)/2*(sigma_t(1-s)/(2s)+1/sigma_t)^2 "
                 "(KL = kl_weight_sum * sum over elements of (v_s-v_t)^2), kl_weight_mean = d^2/2*(...)^2 "
                 "(public-code convention, times the mean over elements)."),
        "sigmas": sigmas,
        "cases": cases,
    }
    (OUT / "sde_step.json").write_text(json.dumps(doc, indent=1) + "\n")


# --------------------------------------------------------------------------------------
# 3. LoRA
# --------------------------------------------------------------------------------------

GRPO_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
FF_TARGETS = GRPO_TARGETS + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]

ADAPTERS = {
    # name: (r, alpha, targets, seed for init of A (torch global RNG), seed for B)
    "lora_a": dict(r=4, alpha=8, targets=GRPO_TARGETS, seed_a=11, seed_b=12, b_std=0.1),
    "lora_b": dict(r=4, alpha=8, targets=GRPO_TARGETS, seed_a=21, seed_b=22, b_std=0.1),
    "lora_ff": dict(r=2, alpha=2, targets=FF_TARGETS, seed_a=31, seed_b=32, b_std=0.15),
}
PEFT_PREFIX = "base_model.model."
LORA_FILE = "pytorch_lora_weights.safetensors"


def load_base() -> SD3Transformer2DModel:
    return SD3Transformer2DModel.from_pretrained(BASE_MODEL, torch_dtype=torch.float32).eval()


def run(model, inputs: dict[str, torch.Tensor], **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(
            hidden_states=inputs["hidden_states"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            pooled_projections=inputs["pooled_projections"],
            timestep=inputs["timestep"],
            return_dict=False,
            **kw,
        )[0].contiguous()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def assert_rel(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-5) -> float:
    r = rel(a, b)
    assert r < tol, f"{what}: relative error {r:.2e} >= {tol}"
    return r


def lora_config(spec: dict) -> LoraConfig:
    cfg = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules=list(spec["targets"]),
                     init_lora_weights="gaussian")
    return cfg


def make_adapter(name: str, spec: dict):
    """PEFT model on a fresh base; A from peft's gaussian init (seeded), B random non-zero."""
    base = load_base()
    torch.manual_seed(spec["seed_a"])
    pm = get_peft_model(base, lora_config(spec))
    pm.eval()
    g = torch.Generator().manual_seed(spec["seed_b"])
    adapted = []
    with torch.no_grad():
        for mname, module in pm.named_modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                b = module.lora_B["default"].weight
                assert torch.count_nonzero(b) == 0  # peft's gaussian init leaves B zero
                b.copy_(spec["b_std"] * torch.randn(b.shape, generator=g))
                a = module.lora_A["default"].weight
                assert torch.count_nonzero(a) == a.numel()
                assert module.scaling["default"] == spec["alpha"] / spec["r"]
                adapted.append(mname.removeprefix(PEFT_PREFIX))
    return pm, adapted


def lora_tensors(pm) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name (diffusers, no prefix): (A [r,in], B [out,r])} of the 'default' adapter."""
    sd = get_peft_model_state_dict(pm)
    out = {}
    for k, v in sd.items():
        assert k.startswith(PEFT_PREFIX), k
        if k.endswith(".lora_A.weight"):
            m = k[len(PEFT_PREFIX):-len(".lora_A.weight")]
            out[m] = (v.detach().clone(), sd[k.replace(".lora_A.", ".lora_B.")].detach().clone())
    return out


def folded_model(deltas: dict[str, torch.Tensor]) -> SD3Transformer2DModel:
    """Base model with float64 weight deltas added (W64 + dW, rounded to f32)."""
    model = load_base()
    with torch.no_grad():
        for mname, dw in deltas.items():
            lin = model.get_submodule(mname)
            assert isinstance(lin, torch.nn.Linear), mname
            assert dw.shape == lin.weight.shape and dw.dtype == torch.float64
            lin.weight.copy_((lin.weight.double() + dw).float())
    return model


def delta(ab: tuple[torch.Tensor, torch.Tensor], scale: float) -> torch.Tensor:
    a, b = ab
    return scale * (b.double() @ a.double())


def canonical_header_(path: Path) -> None:
    """Rewrite a safetensors header with its ``__metadata__`` entries in sorted order.

    The safetensors writer serialises the metadata map in (Rust) hash-map order, which varies
    from run to run once there is more than one entry; this makes the file reproducible.  The
    header keeps its length (same entries, reordered), so the data offsets do not change.
    """
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    text = raw[8:8 + n].decode("utf-8")
    header = json.loads(text)
    if len(header.get("__metadata__", {})) < 2:
        return
    body = text.rstrip(" ")
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    new = json.dumps({"__metadata__": header.pop("__metadata__"), **header}, separators=(",", ":"),
                     ensure_ascii=False)
    assert len(new.encode("utf-8")) == len(body.encode("utf-8")), "unexpected header serialisation"
    assert json.loads(new) == json.loads(text)
    new = new.encode("utf-8") + b" " * (n - len(new.encode("utf-8")))
    path.write_bytes(raw[:8] + new + raw[8 + n:])


def show_keys(path: Path, n: int = 3) -> list[str]:
    with safe_open(path, "pt") as f:
        keys = sorted(f.keys())
        meta = f.metadata()
        print(f"  {path.relative_to(ROOT)}: {len(keys)} keys, e.g.")
        for k in keys[:n]:
            t = f.get_tensor(k)
            print(f"      {k}  {list(t.shape)} {t.dtype}")
        if meta and "lora_adapter_metadata" in meta:
            md = json.loads(meta["lora_adapter_metadata"])
            print(f"    header __metadata__ lora_adapter_metadata (JSON string, keys prefixed 'transformer.'): "
                  f"transformer.r={md.get('transformer.r')} transformer.lora_alpha={md.get('transformer.lora_alpha')} "
                  f"transformer.target_modules={md.get('transformer.target_modules')}")
    return keys


def probe_suffix_matching() -> None:
    """peft matches a list entry t when the module name == t or ends with '.' + t: so 'attn.to_q'
    does not catch 'attn2.to_q' and 'ff.net.0.proj' does not catch 'ff_context.net.0.proj'."""
    for target, want in (("attn.to_q", 4), ("ff.net.0.proj", 4), ("ff_context.net.0.proj", 3),
                         ("to_q", 4 + 2)):
        pm = get_peft_model(load_base(), LoraConfig(r=1, lora_alpha=1, target_modules=[target]))
        names = sorted(n.removeprefix(PEFT_PREFIX) for n, m in pm.named_modules()
                       if hasattr(m, "lora_A") and "default" in m.lora_A)
        print(f"  target_modules=[{target!r}] adapts {len(names)}: {', '.join(names)}")
        assert len(names) == want, names


def write_lora() -> None:
    inputs = load_file(INPUT_CASE)
    assert set(inputs) == {"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"}
    assert inputs["hidden_states"].shape[0] == 2
    expected: dict[str, torch.Tensor] = {}
    base = load_base()
    expected["base"] = run(base, inputs)
    # sanity: the mmdit fixture's own expected output
    mm_expected = load_file(MMDIT / "cases" / "sd35_b2_nonsquare.expected.safetensors")["sample"]
    assert_rel(expected["base"], mm_expected, "base vs mmdit expected", 1e-6)

    all_linear = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    print(f"lora: base sd35_tiny has {len(all_linear)} nn.Linear modules")
    probe_suffix_matching()

    peft_models, adapted, ab = {}, {}, {}
    info = {"adapters": {}, "expected": {}}
    for name, spec in ADAPTERS.items():
        pm, names = make_adapter(name, spec)
        peft_models[name], adapted[name] = pm, names
        ab[name] = lora_tensors(pm)
        assert sorted(ab[name]) == sorted(names)
        # which modules the suffix matching caught
        attn2 = [n for n in names if ".attn2." in n]
        ffc = [n for n in names if ".ff_context." in n]
        ffx = [n for n in names if ".ff." in n]
        print(f"  {name}: r={spec['r']} alpha={spec['alpha']} scale={spec['alpha'] / spec['r']}: "
              f"{len(names)} adapted linears ({len(attn2)} in attn2, {len(ffx)} in ff, {len(ffc)} in ff_context)")
        assert not attn2, "attn2 must not be adapted"
        # Independent suffix match: module name == target or ends with '.' + target.
        want = sorted(n for n in all_linear
                      if any(n == t or n.endswith("." + t) for t in spec["targets"]))
        assert sorted(names) == want, (sorted(set(names) ^ set(want)))
        if spec["targets"] == GRPO_TARGETS:
            assert len(names) == 4 * 8 - 1, len(names)
            assert "transformer_blocks.3.attn.to_add_out" not in names
        else:
            assert len(ffc) == 2 * 3 and len(ffx) == 2 * 4, (ffc, ffx)
        folder = OUT / name
        pm.save_pretrained(folder, safe_serialization=True)
        # save_pretrained also writes a boilerplate model card; not a fixture.
        (folder / "README.md").unlink()
        # Make adapter_config.json independent of the checkout location and of Python's string
        # hash seed (peft keeps target_modules as a set and writes it in set order).
        cfg_path = folder / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = BASE_MODEL_NAME
        assert sorted(cfg["target_modules"]) == sorted(spec["targets"])
        cfg["target_modules"] = sorted(cfg["target_modules"])
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        saved = load_file(folder / "adapter_model.safetensors")
        assert len(saved) == 2 * len(names)
        for m, (a, b) in ab[name].items():
            assert torch.equal(saved[f"{PEFT_PREFIX}{m}.lora_A.weight"], a)
            assert torch.equal(saved[f"{PEFT_PREFIX}{m}.lora_B.weight"], b)
            assert a.shape[0] == spec["r"] and b.shape[1] == spec["r"]
        out = run(pm, inputs)
        expected[name] = out
        change = rel(out, expected["base"])
        print(f"    output relative change vs base: {change:.3f}")
        assert 0.05 < change < 1.0, change
        # single-adapter fold in float64 reproduces the unmerged forward
        scale = spec["alpha"] / spec["r"]
        fold = folded_model({m: delta(v, scale) for m, v in ab[name].items()})
        r = assert_rel(run(fold, inputs), out, f"{name} folded vs unmerged")
        print(f"    float64 fold of alpha/r*B@A vs peft forward: rel {r:.1e}")
        info["adapters"][name] = {"r": spec["r"], "lora_alpha": spec["alpha"], "scale": scale,
                                  "target_modules": spec["targets"], "adapted": sorted(names)}

    # Reload from disk with PEFT (PeftModel.from_pretrained) -> same output.
    from peft import PeftModel
    for name in ADAPTERS:
        re = PeftModel.from_pretrained(load_base(), OUT / name).eval()
        assert_rel(run(re, inputs), expected[name], f"{name} PeftModel.from_pretrained")

    # mixed batch: row 0 with lora_a, row 1 with lora_b
    mixed = torch.cat([expected["lora_a"][:1], expected["lora_b"][1:]], dim=0).contiguous()
    expected["mixed"] = mixed
    pm = PeftModel.from_pretrained(load_base(), OUT / "lora_a", adapter_name="a").eval()
    pm.load_adapter(OUT / "lora_b", adapter_name="b")
    with torch.no_grad():
        peft_mixed = pm(hidden_states=inputs["hidden_states"],
                        encoder_hidden_states=inputs["encoder_hidden_states"],
                        pooled_projections=inputs["pooled_projections"], timestep=inputs["timestep"],
                        return_dict=False, adapter_names=["a", "b"])[0]
    r = assert_rel(peft_mixed, mixed, "peft mixed-batch inference (adapter_names=[a, b])")
    print(f"  mixed: peft mixed-adapter batch inference agrees (rel {r:.1e})")

    # merges, folded by hand in float64
    sa, sb = ADAPTERS["lora_a"], ADAPTERS["lora_b"]
    scale = sa["alpha"] / sa["r"]
    assert scale == sb["alpha"] / sb["r"] and sorted(ab["lora_a"]) == sorted(ab["lora_b"])
    mods = sorted(ab["lora_a"])
    d_exact = {m: 0.5 * (delta(ab["lora_a"][m], scale) + delta(ab["lora_b"][m], scale)) for m in mods}
    d_weighted = {m: 0.25 * delta(ab["lora_a"][m], scale) + 0.75 * delta(ab["lora_b"][m], scale) for m in mods}
    d_abavg = {}
    for m in mods:
        a_avg = (ab["lora_a"][m][0].double() + ab["lora_b"][m][0].double()) / 2.0
        b_avg = (ab["lora_a"][m][1].double() + ab["lora_b"][m][1].double()) / 2.0
        d_abavg[m] = scale * (b_avg @ a_avg)
    expected["merged_exact"] = run(folded_model(d_exact), inputs)
    expected["merged_ab_avg"] = run(folded_model(d_abavg), inputs)
    expected["merged_weighted"] = run(folded_model(d_weighted), inputs)
    r_diff = rel(expected["merged_ab_avg"], expected["merged_exact"])
    print(f"  merged_ab_avg vs merged_exact: relative difference {r_diff:.3f} (must differ)")
    assert r_diff > 1e-3
    assert rel(expected["merged_weighted"], expected["merged_exact"]) > 1e-3
    # cross-checks with peft / diffusers machinery (unmerged, f32)
    pm.add_weighted_adapter(["a", "b"], [0.5, 0.5], "cat_exact", combination_type="cat")
    pm.add_weighted_adapter(["a", "b"], [0.25, 0.75], "cat_weighted", combination_type="cat")
    # 'linear' uses sqrt(w*scale) on A and on B and scale 1: weights 1/4 give alpha/r*B_avg@A_avg
    pm.add_weighted_adapter(["a", "b"], [0.25, 0.25], "linear_quarter", combination_type="linear")
    for adapter, key in (("cat_exact", "merged_exact"), ("cat_weighted", "merged_weighted"),
                         ("linear_quarter", "merged_ab_avg")):
        pm.set_adapter(adapter)
        r = assert_rel(run(pm, inputs), expected[key], f"peft add_weighted_adapter {adapter} vs {key}")
        print(f"  {key}: peft add_weighted_adapter('{adapter}') agrees (rel {r:.1e})")

    # ----- diffusers layout -----
    # As diffusers' training scripts do: add_adapter on the transformer, take
    # get_peft_model_state_dict, and save with the collated metadata.
    tr = load_base()
    tr.add_adapter(lora_config(ADAPTERS["lora_a"]))
    peft_sd = load_file(OUT / "lora_a" / "adapter_model.safetensors")
    stripped = {k.removeprefix(PEFT_PREFIX): v for k, v in peft_sd.items()}
    res = set_peft_model_state_dict(tr, stripped)
    assert not res.unexpected_keys, res.unexpected_keys
    tr_layers = get_peft_model_state_dict(tr)
    assert set(tr_layers) == set(stripped)
    for k in stripped:
        assert torch.equal(tr_layers[k], stripped[k]), k
    assert_rel(run(tr, inputs), expected["lora_a"], "add_adapter + set_peft_model_state_dict")
    meta = _collate_lora_metadata({"transformer": tr})
    # (sorted, so the header does not depend on Python's string hash seed)
    meta["transformer_lora_adapter_metadata"]["target_modules"] = sorted(
        meta["transformer_lora_adapter_metadata"]["target_modules"])
    diff_dir = OUT / "lora_a_diffusers"
    StableDiffusion3Pipeline.save_lora_weights(diff_dir, transformer_lora_layers=tr_layers, **meta)
    nometa_dir = OUT / "lora_a_diffusers_nometa"
    StableDiffusion3Pipeline.save_lora_weights(nometa_dir, transformer_lora_layers=tr_layers)
    for folder in (diff_dir, nometa_dir):
        canonical_header_(folder / LORA_FILE)
        files = sorted(p.name for p in folder.iterdir())
        assert files == ["pytorch_lora_weights.safetensors"], files
        d = load_file(folder / "pytorch_lora_weights.safetensors")
        assert set(d) == {"transformer." + k for k in stripped}
        for k in stripped:
            assert torch.equal(d["transformer." + k], stripped[k])

    # Load back with diffusers' own loader.
    dm = load_base()
    dm.load_lora_adapter(str(diff_dir), weight_name=LORA_FILE, prefix="transformer", adapter_name="a")
    r = assert_rel(run(dm, inputs), expected["lora_a"], "diffusers load_lora_adapter(lora_a_diffusers)")
    print(f"  diffusers SD3Transformer2DModel.load_lora_adapter(lora_a_diffusers) == lora_a (rel {r:.1e})")
    sd_pipe, md = StableDiffusion3Pipeline.lora_state_dict(str(diff_dir), weight_name=LORA_FILE, return_lora_metadata=True)
    assert md, "lora_adapter_metadata missing from the diffusers file"
    dm2 = load_base()
    dm2.load_lora_adapter(sd_pipe, prefix="transformer", adapter_name="a", metadata=md)
    assert_rel(run(dm2, inputs), expected["lora_a"], "diffusers lora_state_dict + load_lora_adapter")
    dm_nm = load_base()
    dm_nm.load_lora_adapter(str(nometa_dir), weight_name=LORA_FILE, prefix="transformer", adapter_name="a")
    out_nm = run(dm_nm, inputs)
    cfg_nm = dm_nm.peft_config["a"]
    print(f"  diffusers load of lora_a_diffusers_nometa: r={cfg_nm.r}, lora_alpha={cfg_nm.lora_alpha} "
          f"(scale {cfg_nm.lora_alpha / cfg_nm.r}, not {ADAPTERS['lora_a']['alpha'] / ADAPTERS['lora_a']['r']})")
    assert cfg_nm.lora_alpha == cfg_nm.r == ADAPTERS["lora_a"]["r"]
    fold1 = folded_model({m: delta(v, 1.0) for m, v in ab["lora_a"].items()})
    assert_rel(out_nm, run(fold1, inputs), "no-metadata load == scale-1 fold")
    assert rel(out_nm, expected["lora_a"]) > 1e-2
    expected["lora_a_nometa_diffusers"] = out_nm

    # diffusers set_adapters with weights (unmerged) == exact weighted merge
    dmw = load_base()
    dmw.load_lora_adapter(str(diff_dir), weight_name=LORA_FILE, prefix="transformer", adapter_name="a")
    b_layers = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(OUT / "lora_b" / "adapter_model.safetensors").items()}
    # (diffusers logs "missing keys ... lora_A.a ..." here: it checks the keys of every loaded
    # adapter against the new state dict; harmless, the output check below is what counts)
    diffusers.utils.logging.set_verbosity_error()
    with warnings.catch_warnings():  # peft: "Already found a `peft_config` attribute" (intended)
        warnings.simplefilter("ignore", UserWarning)
        dmw.load_lora_adapter({"transformer." + k: v for k, v in b_layers.items()}, prefix="transformer",
                              adapter_name="b",
                              metadata={"transformer." + k: v
                                        for k, v in lora_config(ADAPTERS["lora_b"]).to_dict().items()})
    diffusers.utils.logging.set_verbosity_warning()
    dmw.set_adapters(["a", "b"], weights=[0.25, 0.75])
    r = assert_rel(run(dmw, inputs), expected["merged_weighted"], "diffusers set_adapters([a,b],[.25,.75])")
    print(f"  merged_weighted: diffusers set_adapters(['a','b'], [0.25, 0.75]) agrees (rel {r:.1e})")

    for k, v in expected.items():
        assert v.dtype == torch.float32 and v.shape == inputs["hidden_states"].shape, k
    save_file({k: v.contiguous() for k, v in expected.items()}, OUT / "lora_expected.safetensors",
              metadata={"format": "pt"})
    info["input_case"] = "tests/fixtures/mmdit/cases/sd35_b2_nonsquare.inputs.safetensors"
    info["base_model"] = BASE_MODEL_NAME
    info["expected"] = {
        "base": "no adapter",
        "lora_a": "lora_a active, scale lora_alpha/r = 2",
        "lora_b": "lora_b active, scale 2",
        "lora_ff": "lora_ff active, scale 1",
        "mixed": "row 0 = lora_a output, row 1 = lora_b output",
        "merged_exact": "W + 0.5*(dW_a + dW_b), dW = (alpha/r) B A, folded in float64, rounded to f32",
        "merged_ab_avg": "W + (alpha/r) * ((B_a+B_b)/2) @ ((A_a+A_b)/2), folded in float64",
        "merged_weighted": "W + 0.25*dW_a + 0.75*dW_b, folded in float64",
        "lora_a_nometa_diffusers": "lora_a_diffusers_nometa as diffusers loads it: lora_alpha = r (scale 1)",
    }
    info["relative_change_vs_base"] = {k: round(rel(v, expected["base"]), 6) for k, v in expected.items()
                                       if k != "base"}
    (OUT / "lora.json").write_text(json.dumps(info, indent=1) + "\n")

    print("key naming:")
    for p in (OUT / "lora_a" / "adapter_model.safetensors", OUT / "lora_ff" / "adapter_model.safetensors",
              diff_dir / "pytorch_lora_weights.safetensors", nometa_dir / "pytorch_lora_weights.safetensors",
              OUT / "lora_expected.safetensors"):
        show_keys(p)
    print("  lora_a/adapter_config.json:")
    print("    " + (OUT / "lora_a" / "adapter_config.json").read_text().replace("\n", "\n    "))


# --------------------------------------------------------------------------------------

def main() -> int:
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
          f"numpy {np.__version__}")
    assert (BASE_MODEL / "config.json").exists() and INPUT_CASE.exists(), \
        "run tools/make_mmdit_fixtures.py first"
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)

    sigmas = write_schedule()
    write_sde_step(sigmas[(3.0, 10)])
    write_lora()

    print("files:")
    total = 0
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            size = p.stat().st_size
            total += size
            digest = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            print(f"  {size:>9,d}  {digest}  {p.relative_to(ROOT)}")
    print(f"  {total:>9,d}  total")
    assert total < 1_500_000, "fixtures too large"
    return 0


if __name__ == "__main__":
    sys.exit(main())
