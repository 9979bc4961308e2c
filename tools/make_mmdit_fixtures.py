#!/usr/bin/env python3
"""Generate the tiny SD3 / SD3.5 MMDiT reference fixtures used by the Rust tests.

Everything is produced with HuggingFace ``diffusers``' own ``SD3Transformer2DModel``
(the reference implementation we are matching), with fixed seeds, on the CPU, in
float32.

Regenerate (from the repository root)::

    python3 -m venv tools/.venv \
      && tools/.venv/bin/pip install -r tools/requirements.txt \
      && tools/.venv/bin/python tools/make_mmdit_fixtures.py

(``--print-mapping`` additionally prints the full Stability <- diffusers key table.)

Output, all under ``tests/fixtures/mmdit/``:

``sd3_tiny/``, ``sd35_tiny/``
    ``config.json`` + ``diffusion_pytorch_model.safetensors`` (f32, single file),
    written by ``save_pretrained``.  ``sd3_tiny`` is SD3-Medium shaped (no qk-norm,
    no dual attention); ``sd35_tiny`` is SD3.5-Medium shaped (RMSNorm qk-norm, dual
    attention in blocks 0 and 1).  All weights *and* the persistent
    ``pos_embed.pos_embed`` buffer are re-randomised after construction, so nothing
    is zero or constant (diffusers zero-initialises nothing here, but the real
    checkpoints' structure, e.g. the adaLN modulation, would otherwise hide bugs in
    ordering / splitting of tensors).
``sd35_tiny_sharded/``
    the ``sd35_tiny`` weights saved with a small ``max_shard_size`` (several
    ``diffusion_pytorch_model-0000k-of-0000n.safetensors`` shards plus
    ``diffusion_pytorch_model.safetensors.index.json``).
``sd35_tiny_f16/``, ``sd35_tiny_bf16/``
    the ``sd35_tiny`` weights stored as float16 / bfloat16 (config.json copied).
``sd3_tiny_stability.safetensors``, ``sd35_tiny_stability.safetensors``
    the same f32 weights in Stability AI's original single-file layout
    (``model.diffusion_model.joint_blocks.{i}.x_block.attn.qkv.weight`` ...), produced
    by the exact inverse of diffusers'
    ``convert_sd3_transformer_checkpoint_to_diffusers``; the script verifies that
    diffusers' converter maps it back bit-exactly, and that
    ``SD3Transformer2DModel.from_single_file`` loads it to identical outputs.
``cases/<case>.inputs.safetensors`` / ``cases/<case>.expected.safetensors`` / ``cases/cases.json``
    forward-pass cases.  Inputs: ``hidden_states [B,C,H,W]``,
    ``encoder_hidden_states [B,L,D]``, ``pooled_projections [B,P]``,
    ``timestep [B]`` (already ``1000 * sigma``), all f32.  Expected:
    ``sample [B,C,H,W]`` f32 = ``model(..., return_dict=False)[0]``.  For the f16 /
    bf16 cases the expected output is what an f32 engine gets when it upcasts the
    stored half-precision weights to f32 and computes in f32.

The script is deterministic in what it writes for the weights and inputs (seeded
``torch.Generator``s); the expected outputs are float32 CPU results and may differ
from another machine / torch build in the last few ulps only.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffusers
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "mmdit"
CASES_DIR = OUT / "cases"

STABILITY_PREFIX = "model.diffusion_model."

COMMON = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    caption_projection_dim=16,
    pooled_projection_dim=12,
    pos_embed_max_size=8,
)

MODELS = {
    # SD3-Medium style: no qk-norm, no dual attention.
    "sd3_tiny": dict(COMMON, num_layers=3, qk_norm=None, dual_attention_layers=()),
    # SD3.5-Medium style: RMSNorm qk-norm, dual attention (MMDiT-X) in the first blocks.
    "sd35_tiny": dict(COMMON, num_layers=4, qk_norm="rms_norm", dual_attention_layers=(0, 1)),
}
MODEL_SEEDS = {"sd3_tiny": 1234, "sd35_tiny": 5678}

# (case, model folder, base model, B, H, W, L, timesteps, seed)
CASES = [
    # 4x4 patches inside the 8x8 table: centre crop (top = left = 2).
    dict(case="sd3_b2_square", model="sd3_tiny", base="sd3_tiny", batch=2, height=8, width=8,
         ctx_len=5, timestep=[937.5, 123.456], seed=101),
    # 3x6 patches: top = (8-3)//2 = 2, left = (8-6)//2 = 1.
    dict(case="sd35_b2_nonsquare", model="sd35_tiny", base="sd35_tiny", batch=2, height=6, width=12,
         ctx_len=7, timestep=[999.0, 8.9286], seed=102),
    # 8x8 patches = the whole table, no crop.
    dict(case="sd35_b1_full_table", model="sd35_tiny", base="sd35_tiny", batch=1, height=16, width=16,
         ctx_len=3, timestep=[500.25], seed=103),
    # 6x2 patches: top = 1, left = 3.
    dict(case="sd35_b3_tall", model="sd35_tiny", base="sd35_tiny", batch=3, height=12, width=4,
         ctx_len=4, timestep=[871.3, 250.75, 17.0625], seed=104),
    # Half-precision weight files, computed in f32 on the upcast weights.
    dict(case="sd35_f16_b2", model="sd35_tiny_f16", base="sd35_tiny", batch=2, height=6, width=12,
         ctx_len=7, timestep=[642.857, 71.4286], seed=105),
    dict(case="sd35_bf16_b2", model="sd35_tiny_bf16", base="sd35_tiny", batch=2, height=6, width=12,
         ctx_len=7, timestep=[333.333, 95.2381], seed=106),
]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


# --------------------------------------------------------------------------------------
# Model construction and re-randomisation
# --------------------------------------------------------------------------------------

def rerandomise_(model: SD3Transformer2DModel, seed: int) -> None:
    """Overwrite every parameter and the pos-embed buffer with seeded random values.

    * matrices / conv kernels: N(0, 1/fan_in) (std 0.25 for the 16-wide layers), so
      every linear map keeps activations O(1);
    * biases: N(0, 0.1^2);
    * RMSNorm (qk-norm) weights: 1 + N(0, 0.1^2);
    * ``pos_embed.pos_embed`` ([1, 64, 16]): N(0, 0.5^2), comparable to the patch
      embedding output so the crop offsets matter.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                new = 0.1 * torch.randn(p.shape, generator=g)
            elif p.dim() == 1:
                assert "norm" in name, f"unexpected 1-d parameter {name}"
                new = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            else:
                fan_in = math.prod(p.shape[1:])
                new = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
            p.copy_(new.to(p.dtype))
        pe = model.pos_embed.pos_embed
        pe.copy_(0.5 * torch.randn(pe.shape, generator=g))


def check_no_constant_tensors(sd: dict[str, torch.Tensor]) -> None:
    for k, v in sd.items():
        v = v.float()
        assert v.numel() > 1, k
        assert (v == 0).sum().item() == 0, f"{k} has exact zeros"
        assert v.std().item() > 0.01, f"{k} is (nearly) constant"


def build_model(name: str) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**MODELS[name])
    assert all(t.dtype == torch.float32 for t in model.state_dict().values())
    rerandomise_(model, MODEL_SEEDS[name])
    model.eval()
    sd = model.state_dict()
    assert "pos_embed.pos_embed" in sd, "pos_embed buffer must be persistent"
    check_no_constant_tensors(sd)
    return model


def run(model: SD3Transformer2DModel, inputs: dict[str, torch.Tensor], **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(
            hidden_states=inputs["hidden_states"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            pooled_projections=inputs["pooled_projections"],
            timestep=inputs["timestep"],
            return_dict=False,
            **kw,
        )[0]


def make_inputs(cfg: dict, case: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(case["seed"])
    b, h, w, l = case["batch"], case["height"], case["width"], case["ctx_len"]
    inputs = {
        "hidden_states": torch.randn(b, cfg["in_channels"], h, w, generator=g),
        "encoder_hidden_states": torch.randn(b, l, cfg["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(b, cfg["pooled_projection_dim"], generator=g),
        "timestep": torch.tensor(case["timestep"], dtype=torch.float32),
    }
    assert inputs["timestep"].shape == (b,)
    return {k: v.to(torch.float32).contiguous() for k, v in inputs.items()}


# --------------------------------------------------------------------------------------
# diffusers -> Stability (original SD3 / SD3.5 single-file) layout
# --------------------------------------------------------------------------------------

def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """Inverse (and self-inverse) of diffusers' ``swap_scale_shift``: [a; b] -> [b; a]."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def diffusers_to_stability(sd: dict[str, torch.Tensor], cfg: dict) -> tuple[dict, list]:
    """Exact inverse of ``convert_sd3_transformer_checkpoint_to_diffusers``.

    Returns the Stability-layout dict (keys prefixed ``model.diffusion_model.``) and a
    list of ``(stability_key, diffusers_key(s), note)`` rows describing the mapping.
    """
    num_layers = cfg["num_layers"]
    dual = set(cfg["dual_attention_layers"])
    has_qk = cfg["qk_norm"] is not None
    remaining = dict(sd)
    out: dict[str, torch.Tensor] = {}
    mapping: list[tuple[str, str, str]] = []

    def take(k: str) -> torch.Tensor:
        return remaining.pop(k)

    def put(skey: str, dkeys: list[str], value: torch.Tensor, note: str = "") -> None:
        assert skey not in out, skey
        out[STABILITY_PREFIX + skey] = value.detach().clone().contiguous()
        mapping.append((skey, " + ".join(dkeys), note))

    def one(skey: str, dkey: str, note: str = "") -> None:
        put(skey, [dkey], take(dkey), note)

    def fused_qkv(skey: str, dq: str, dk: str, dv: str) -> None:
        put(skey, [dq, dk, dv], torch.cat([take(dq), take(dk), take(dv)], dim=0), "cat([q,k,v], dim=0)")

    def swapped(skey: str, dkey: str) -> None:
        put(skey, [dkey], swap_halves(take(dkey)), "halves swapped (stability=[shift;scale], diffusers=[scale;shift])")

    one("pos_embed", "pos_embed.pos_embed")
    for s in ("weight", "bias"):
        one(f"x_embedder.proj.{s}", f"pos_embed.proj.{s}")
    for s in ("weight", "bias"):
        one(f"t_embedder.mlp.0.{s}", f"time_text_embed.timestep_embedder.linear_1.{s}")
        one(f"t_embedder.mlp.2.{s}", f"time_text_embed.timestep_embedder.linear_2.{s}")
        one(f"y_embedder.mlp.0.{s}", f"time_text_embed.text_embedder.linear_1.{s}")
        one(f"y_embedder.mlp.2.{s}", f"time_text_embed.text_embedder.linear_2.{s}")
        one(f"context_embedder.{s}", f"context_embedder.{s}")

    for i in range(num_layers):
        j, b = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        last = i == num_layers - 1
        for s in ("weight", "bias"):
            fused_qkv(f"{j}x_block.attn.qkv.{s}", f"{b}attn.to_q.{s}", f"{b}attn.to_k.{s}", f"{b}attn.to_v.{s}")
            fused_qkv(f"{j}context_block.attn.qkv.{s}", f"{b}attn.add_q_proj.{s}",
                      f"{b}attn.add_k_proj.{s}", f"{b}attn.add_v_proj.{s}")
            one(f"{j}x_block.attn.proj.{s}", f"{b}attn.to_out.0.{s}")
            if not last:
                one(f"{j}context_block.attn.proj.{s}", f"{b}attn.to_add_out.{s}")
            if i in dual:
                fused_qkv(f"{j}x_block.attn2.qkv.{s}", f"{b}attn2.to_q.{s}", f"{b}attn2.to_k.{s}",
                          f"{b}attn2.to_v.{s}")
                one(f"{j}x_block.attn2.proj.{s}", f"{b}attn2.to_out.0.{s}")
            one(f"{j}x_block.adaLN_modulation.1.{s}", f"{b}norm1.linear.{s}")
            if last:
                swapped(f"{j}context_block.adaLN_modulation.1.{s}", f"{b}norm1_context.linear.{s}")
            else:
                one(f"{j}context_block.adaLN_modulation.1.{s}", f"{b}norm1_context.linear.{s}")
            one(f"{j}x_block.mlp.fc1.{s}", f"{b}ff.net.0.proj.{s}")
            one(f"{j}x_block.mlp.fc2.{s}", f"{b}ff.net.2.{s}")
            if not last:
                one(f"{j}context_block.mlp.fc1.{s}", f"{b}ff_context.net.0.proj.{s}")
                one(f"{j}context_block.mlp.fc2.{s}", f"{b}ff_context.net.2.{s}")
        if has_qk:
            one(f"{j}x_block.attn.ln_q.weight", f"{b}attn.norm_q.weight")
            one(f"{j}x_block.attn.ln_k.weight", f"{b}attn.norm_k.weight")
            one(f"{j}context_block.attn.ln_q.weight", f"{b}attn.norm_added_q.weight")
            one(f"{j}context_block.attn.ln_k.weight", f"{b}attn.norm_added_k.weight")
            if i in dual:
                one(f"{j}x_block.attn2.ln_q.weight", f"{b}attn2.norm_q.weight")
                one(f"{j}x_block.attn2.ln_k.weight", f"{b}attn2.norm_k.weight")

    for s in ("weight", "bias"):
        one(f"final_layer.linear.{s}", f"proj_out.{s}")
        swapped(f"final_layer.adaLN_modulation.1.{s}", f"norm_out.linear.{s}")

    assert not remaining, f"diffusers keys not mapped: {sorted(remaining)}"
    return out, mapping


def verify_stability_roundtrip(stab: dict, sd: dict) -> None:
    """diffusers' own converter must give back exactly ``sd`` (keys and bits)."""
    work = dict(stab)  # the converter pops from (and renames inside) its argument
    conv = convert_sd3_transformer_checkpoint_to_diffusers(work)
    assert not work, f"converter left stability keys unused: {sorted(work)}"
    assert set(conv) == set(sd), (sorted(set(conv) ^ set(sd)))
    for k in sd:
        a, b = conv[k], sd[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert torch.equal(a, b), f"converter round trip differs at {k}"


# --------------------------------------------------------------------------------------
# Independent reference forward on the Stability-layout weights
# --------------------------------------------------------------------------------------

def stability_reference_forward(stab: dict, cfg: dict, inputs: dict) -> torch.Tensor:
    """Plain-torch MMDiT forward written from the *original* (Stability) semantics.

    It reads the Stability-layout dict directly (fused qkv, [shift; scale] order in
    the final layer / last context block, [context, x] token order in the joint
    attention), so agreeing with diffusers' output checks the key mapping and the
    modulation orders independently of diffusers' converter.
    """
    F = torch.nn.functional
    w = {k[len(STABILITY_PREFIX):]: v.double() for k, v in stab.items()}
    x_in = inputs["hidden_states"].double()
    ctx = inputs["encoder_hidden_states"].double()
    y = inputs["pooled_projections"].double()
    t = inputs["timestep"].double()
    p, m, nh = cfg["patch_size"], cfg["pos_embed_max_size"], cfg["num_attention_heads"]
    hd = cfg["attention_head_dim"]
    dim = nh * hd
    B, C, H, W = x_in.shape
    h, wd = H // p, W // p

    def lin(x, name):
        return F.linear(x, w[name + ".weight"], w[name + ".bias"])

    def ln(x):
        return F.layer_norm(x, (x.shape[-1],), eps=1e-6)

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    def modulate(x, shift, scale):
        return x * (1 + scale[:, None]) + shift[:, None]

    # patch embed + cropped position embedding
    x = F.conv2d(x_in, w["x_embedder.proj.weight"], w["x_embedder.proj.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2)
    top, left = (m - h) // 2, (m - wd) // 2
    pe = w["pos_embed"].reshape(1, m, m, dim)[:, top:top + h, left:left + wd].reshape(1, h * wd, dim)
    x = x + pe
    # timestep: 256-d sinusoid, [cos, sin], freqs exp(-ln(1e4) * i / 128)
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = t[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c = lin(F.silu(lin(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + lin(F.silu(lin(y, "y_embedder.mlp.0")), "y_embedder.mlp.2")
    ctx = lin(ctx, "context_embedder")

    def qkv(xn, pre):
        q, k, v = lin(xn, pre + ".qkv").reshape(B, xn.shape[1], 3, nh, hd).unbind(2)
        if pre + ".ln_q.weight" in w:
            q, k = rms(q, w[pre + ".ln_q.weight"]), rms(k, w[pre + ".ln_k.weight"])
        return q, k, v

    def attention(q, k, v):  # [B, L, nh, hd]
        a = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd), dim=-1)
        return torch.einsum("bhqk,bkhd->bqhd", a, v).reshape(q.shape[0], q.shape[1], dim)

    def mlp(xn, pre):
        return lin(F.gelu(lin(xn, pre + ".fc1"), approximate="tanh"), pre + ".fc2")

    n = cfg["num_layers"]
    sc = F.silu(c)
    for i in range(n):
        jb = f"joint_blocks.{i}."
        last = i == n - 1
        dual = (jb + "x_block.attn2.qkv.weight") in w
        xm = lin(sc, jb + "x_block.adaLN_modulation.1").chunk(9 if dual else 6, dim=1)
        cm = lin(sc, jb + "context_block.adaLN_modulation.1").chunk(2 if last else 6, dim=1)
        xn = ln(x)
        cq, ck, cv = qkv(modulate(ln(ctx), cm[0], cm[1]), jb + "context_block.attn")
        xq, xk, xv = qkv(modulate(xn, xm[0], xm[1]), jb + "x_block.attn")
        o = attention(torch.cat([cq, xq], 1), torch.cat([ck, xk], 1), torch.cat([cv, xv], 1))
        c_att, x_att = o[:, :ctx.shape[1]], o[:, ctx.shape[1]:]
        # x stream
        x = x + xm[2][:, None] * lin(x_att, jb + "x_block.attn.proj")
        if dual:
            q2, k2, v2 = qkv(modulate(xn, xm[6], xm[7]), jb + "x_block.attn2")
            x = x + xm[8][:, None] * lin(attention(q2, k2, v2), jb + "x_block.attn2.proj")
        x = x + xm[5][:, None] * mlp(modulate(ln(x), xm[3], xm[4]), jb + "x_block.mlp")
        # context stream
        if not last:
            ctx = ctx + cm[2][:, None] * lin(c_att, jb + "context_block.attn.proj")
            ctx = ctx + cm[5][:, None] * mlp(modulate(ln(ctx), cm[3], cm[4]), jb + "context_block.mlp")
    shift, scale = lin(sc, "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    x = lin(modulate(ln(x), shift, scale), "final_layer.linear")
    x = x.reshape(B, h, wd, p, p, cfg["out_channels"])
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, cfg["out_channels"], H, W).float()


# --------------------------------------------------------------------------------------
# Sanity checks on the random model
# --------------------------------------------------------------------------------------

def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    diff = (a - b).abs().max().item()
    assert diff <= 1e-5, f"{what}: max abs diff {diff}"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def sensitivity_report(model: SD3Transformer2DModel, inputs: dict, label: str) -> None:
    """Show that no single term dominates: ablating each piece changes the output."""
    base = run(model, inputs)
    std = base.std().item()
    # fraction of the output variance that is just a per-channel constant (biases)
    chan_mean = base.mean(dim=(0, 2, 3), keepdim=True)
    const_frac = (chan_mean.expand_as(base).pow(2).mean() / base.pow(2).mean()).item()
    rows = []

    def ablate(desc, **changes):
        inp = dict(inputs)
        inp.update(changes)
        rows.append((desc, rel(run(model, inp), base)))

    ablate("timestep +1", timestep=inputs["timestep"] + 1.0)
    ablate("pooled := 0", pooled_projections=torch.zeros_like(inputs["pooled_projections"]))
    ablate("context := 0", encoder_hidden_states=torch.zeros_like(inputs["encoder_hidden_states"]))
    ablate("latent := 0", hidden_states=torch.zeros_like(inputs["hidden_states"]))
    pe = model.pos_embed.pos_embed
    saved = pe.detach().clone()
    with torch.no_grad():
        pe.zero_()
    rows.append(("pos_embed := 0", rel(run(model, inputs), base)))
    with torch.no_grad():
        pe.copy_(saved)
        pe.copy_(torch.roll(saved, shifts=1, dims=1))
    rows.append(("pos_embed rolled by 1", rel(run(model, inputs), base)))
    with torch.no_grad():
        pe.copy_(saved)
    for i in range(len(model.transformer_blocks)):
        rows.append((f"skip block {i}", rel(run(model, inputs, skip_layers=[i]), base)))
    print(f"  [{label}] output std {std:.3f}, mean {base.mean().item():+.3f}, "
          f"absmax {base.abs().max().item():.3f}, per-channel-constant share {const_frac:.3f}")
    print("    relative output change: " + ", ".join(f"{d}: {r:.3f}" for d, r in rows))
    assert 0.2 < std < 5.0, f"output std {std} not O(1)"
    assert const_frac < 0.5, "output dominated by a per-channel constant"
    for d, r in rows:
        assert r > 0.01, f"{label}: ablation '{d}' barely changes the output ({r})"

    # The context queries of the last (context_pre_only) block never reach the output.
    last = model.transformer_blocks[-1]
    if last.attn.norm_added_q is not None:
        w = last.attn.norm_added_q.weight
        saved_w = w.detach().clone()
        with torch.no_grad():
            w.mul_(3.0)
        d = rel(run(model, inputs), base)
        with torch.no_grad():
            w.copy_(saved_w)
        print(f"    last block norm_added_q x3 -> relative change {d:.2e} (dead parameter)")
        assert d < 1e-6


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------

def clean_outputs() -> None:
    for name in ["sd3_tiny", "sd35_tiny", "sd35_tiny_sharded", "sd35_tiny_f16", "sd35_tiny_bf16", "cases"]:
        if (OUT / name).exists():
            shutil.rmtree(OUT / name)
    for name in ["sd3_tiny_stability.safetensors", "sd35_tiny_stability.safetensors"]:
        (OUT / name).unlink(missing_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    CASES_DIR.mkdir(parents=True, exist_ok=True)


def load_f32_from_file_upcast(folder: Path, cfg: dict) -> SD3Transformer2DModel:
    """Load a (possibly half-precision) weight file and upcast every tensor to f32."""
    sd = {k: v.to(torch.float32) for k, v in load_file(folder / WEIGHTS_NAME).items()}
    model = SD3Transformer2DModel(**cfg)
    missing, unexpected = model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    return model.eval()


def main() -> int:
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    clean_outputs()

    models: dict[str, SD3Transformer2DModel] = {}
    for name, cfg in MODELS.items():
        model = build_model(name)
        models[name] = model
        folder = OUT / name
        model.save_pretrained(folder, safe_serialization=True)
        with safe_open(folder / WEIGHTS_NAME, "pt") as f:
            keys = set(f.keys())
            assert "pos_embed.pos_embed" in keys
            assert all(f.get_tensor(k).dtype == torch.float32 for k in keys)
        sd = model.state_dict()
        assert keys == set(sd)

        # Stability single-file layout.
        stab, mapping = diffusers_to_stability(sd, cfg)
        verify_stability_roundtrip(stab, sd)
        stab_path = OUT / f"{name}_stability.safetensors"
        save_file(stab, stab_path)
        verify_stability_roundtrip(load_file(stab_path), sd)
        if "--print-mapping" in sys.argv:
            print(f"{name}: stability <- diffusers key mapping (prefix {STABILITY_PREFIX!r} omitted)")
            for skey, dkeys, note in mapping:
                print(f"  {skey} <- {dkeys}" + (f"   [{note}]" if note else ""))

        # from_single_file with the local config folder (no hub access).
        fs = SD3Transformer2DModel.from_single_file(
            str(stab_path), config=str(folder), local_files_only=True  # f32 by default
        ).eval()
        fs_sd = fs.state_dict()
        assert set(fs_sd) == set(sd)
        for k in sd:
            assert torch.equal(fs_sd[k], sd[k]), f"from_single_file differs at {k}"
        models[name + "@single_file"] = fs
        print(f"{name}: {sum(v.numel() for v in sd.values())} values, stability file verified "
              f"({len(stab)} keys; converter and from_single_file round trips exact)")

    # SD3.5 variants.
    base35 = models["sd35_tiny"]
    sd35 = base35.state_dict()
    sharded = OUT / "sd35_tiny_sharded"
    base35.save_pretrained(sharded, safe_serialization=True, max_shard_size="60KB")
    index = json.loads((sharded / f"{WEIGHTS_NAME}.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2, shards
    assert set(index["weight_map"]) == set(sd35)
    resharded = SD3Transformer2DModel.from_pretrained(sharded, torch_dtype=torch.float32).eval()
    for k, v in resharded.state_dict().items():
        assert torch.equal(v, sd35[k]), k
    print(f"sd35_tiny_sharded: {len(shards)} shards")

    for suffix, dtype in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        folder = OUT / f"sd35_tiny_{suffix}"
        folder.mkdir(parents=True)
        shutil.copy(OUT / "sd35_tiny" / "config.json", folder / "config.json")
        half = {k: v.to(dtype).contiguous() for k, v in sd35.items()}
        save_file(half, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        with safe_open(folder / WEIGHTS_NAME, "pt") as f:
            assert all(f.get_tensor(k).dtype == dtype for k in f.keys())
        check_no_constant_tensors(half)  # nothing flushed to zero by the rounding
        models[f"sd35_tiny_{suffix}"] = load_f32_from_file_upcast(folder, MODELS["sd35_tiny"])
        models[f"sd35_tiny_{suffix}@from_pretrained"] = SD3Transformer2DModel.from_pretrained(
            folder, torch_dtype=torch.float32).eval()

    # Forward cases.
    print("cases:")
    cases_json = []
    for case in CASES:
        cfg = MODELS[case["base"]]
        inputs = make_inputs(cfg, case)
        model = models[case["model"]]
        sample = run(model, inputs).contiguous()
        assert sample.dtype == torch.float32
        assert sample.shape == inputs["hidden_states"].shape[:1] + (cfg["out_channels"],) + \
            inputs["hidden_states"].shape[2:]
        # Cross-checks: reload from disk / other loaders give the same numbers.
        if case["model"] in MODELS:
            # (Weights are bit-identical, but tensors loaded from a file can sit at a
            # different memory alignment, which changes CPU SIMD summation order, so
            # outputs are compared to ~1e-6 rather than bitwise.)
            reloaded = SD3Transformer2DModel.from_pretrained(OUT / case["model"], torch_dtype=torch.float32).eval()
            assert_close(run(reloaded, inputs), sample, "from_pretrained")
            assert_close(run(models[case["model"] + "@single_file"], inputs), sample, "from_single_file")
            if case["model"] == "sd35_tiny":
                assert_close(run(resharded, inputs), sample, "sharded from_pretrained")
        else:
            assert_close(run(models[case["model"] + "@from_pretrained"], inputs), sample,
                         "from_pretrained(torch_dtype=float32) of the half file")
            f32_out = run(base35, inputs)
            print(f"  {case['case']}: |out(half-rounded weights) - out(f32 weights)| rel "
                  f"{rel(sample, f32_out):.2e}")
            assert rel(sample, f32_out) > 0.0
        # Independent float64 re-implementation from the Stability-layout weights.
        stab_w = load_file(OUT / f"{case['base']}_stability.safetensors")
        if case["model"] != case["base"]:  # half-precision files: same rounding, via the upcast state dict
            stab_w, _ = diffusers_to_stability(model.state_dict(), cfg)
        ref_out = stability_reference_forward(stab_w, cfg, inputs)
        ref_err = (ref_out - sample).abs().max().item()
        assert ref_err < 1e-4, f"independent reference disagrees: {ref_err}"
        save_file(inputs, CASES_DIR / f"{case['case']}.inputs.safetensors")
        save_file({"sample": sample}, CASES_DIR / f"{case['case']}.expected.safetensors")
        cases_json.append({"case": case["case"], "model": case["model"], "batch": case["batch"],
                           "height": case["height"], "width": case["width"]})
        print(f"  {case['case']}: model {case['model']}, hidden {tuple(inputs['hidden_states'].shape)}, "
              f"context {tuple(inputs['encoder_hidden_states'].shape)}, t {case['timestep']}, "
              f"out std {sample.std().item():.4f}, absmax {sample.abs().max().item():.4f}, "
              f"|f64 stability-layout reference - expected| {ref_err:.1e}")
        if case["case"] in ("sd3_b2_square", "sd35_b2_nonsquare"):
            sensitivity_report(model, inputs, case["case"])
    (CASES_DIR / "cases.json").write_text(json.dumps(cases_json, indent=2) + "\n")

    # Summary.
    print("files:")
    total = 0
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            size = p.stat().st_size
            total += size
            print(f"  {size:>9,d}  {p.relative_to(ROOT)}")
    print(f"  {total:>9,d}  total")
    assert total < 3_000_000, "fixtures too large"
    return 0


if __name__ == "__main__":
    sys.exit(main())
