#!/usr/bin/env python3
"""Tiny random SD3 text encoders + tokenizers and reference outputs for tests/suite/sd3_text_parity.rs.

Writes, with fixed seeds, on the CPU in float32:

* tests/fixtures/sd3_tiny/{text_encoder,text_encoder_2,text_encoder_3,tokenizer,tokenizer_2,tokenizer_3}/
  in diffusers pipeline layout (save_pretrained of transformers models and tokenizers):
  - text_encoder:   CLIPTextModelWithProjection, hidden 32, 2 layers, quick_gelu, legacy eos_token_id = 2
                    (pooled = argmax of the ids), projection 32 -> 32 (like CLIP-L, 768 -> 768)
  - text_encoder_2: CLIPTextModelWithProjection, hidden 48, 3 layers, gelu, eos_token_id = id of
                    <|endoftext|> (pooled = first EOS), projection 48 -> 40 (like CLIP-G, 1280 -> 1280)
  - text_encoder_3: T5EncoderModel, d_model 88 (> 32 + 48, so the CLIP features are zero-padded),
                    2 layers, 4 heads of d_kv 8 (inner 32 != d_model), d_ff 64, gated-gelu, 32 buckets,
                    max distance 20
  - tokenizer / tokenizer_2: one byte-level BPE (transformers' CLIPTokenizer from a vocab and merges
    learned here on a small corpus); tokenizer pads with "<|endoftext|>", tokenizer_2 with "!" (as
    SD3's real tokenizer_2)
  - tokenizer_3: transformers' T5Tokenizer over a small Unigram vocabulary built from the corpus
* tests/fixtures/sd3_text/reference.safetensors: token ids of every tokenizer for the prompts, each
  encoder's outputs and the assembled SD3 prompt embeddings from diffusers'
  StableDiffusion3Pipeline.encode_prompt (transformer, vae and scheduler None), with the negative
  prompt "" for classifier-free guidance.
* tests/fixtures/sd3_text/reference.json: the prompts and the T5 max_sequence_length used.

No model_index.json is written: encode_prompt runs on a pipeline object built in memory.
"""

import json
import math
import os

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Regex, normalizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from diffusers import StableDiffusion3Pipeline

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "sd3_tiny"
REF = ROOT / "tests" / "fixtures" / "sd3_text"
T5_MAX_LEN = 32

CORPUS = [
    "a photo of a cat sitting on a red sofa",
    "a painting of a dog in the style of van gogh",
    "three blue cubes to the left of a green sphere",
    "the word hello written on a sign, neon lights",
    "a watercolor landscape with mountains and a lake at sunset",
    "an astronaut riding a horse on the moon, highly detailed",
    "two small birds on a branch; soft light, 4k photograph",
    "a bowl of fruit: apples, oranges and bananas on a wooden table",
    "portrait of an old man with a beard, dramatic lighting",
    "a city street at night in the rain, reflections, cinematic",
    "a cute robot holding a flower, digital art",
    "it's a sunny day and we're going to the beach",
] * 4

PROMPTS = [
    "a photo of a cat",
    "  A  RED cube, on the LEFT of two blue spheres!  ",
    "café naïve 東京 — ümlaut",
    "",
    # > 77 CLIP tokens and > T5_MAX_LEN T5 tokens: truncated.
    " ".join(
        ["a very long prompt about a watercolor landscape with mountains, a lake at sunset and birds"] * 6
    ),
]


def bytes_to_unicode():
    """GPT-2 / CLIP byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def learn_bpe(words, num_merges):
    """Plain BPE learning (most frequent adjacent pair first, ties by the pair's text), written
    out here because the `tokenizers` trainers are not reproducible run to run."""
    counts = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    seqs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in counts}
    merges = []
    for _ in range(num_merges):
        pairs = {}
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges


def make_clip_tokenizers():
    """A small CLIP BPE: all 256 byte characters (bare and with "</w>"), merges learned on the
    corpus, then <|startoftext|>, <|endoftext|> last (so EOS has the largest id, as in CLIP)."""
    probe = CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[])
    backend = probe._tokenizer
    words = []
    for line in CORPUS:
        normalized = backend.normalizer.normalize_str(line)
        words += [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]
    merges = learn_bpe(words, 300)
    chars = bytes_to_unicode()
    vocab = {}
    for token in chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]:
        vocab.setdefault(token, len(vocab))
    for token in ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tok_2 = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=77)
    return tok, tok_2, len(vocab)


def make_t5_tokenizer():
    """A small Unigram vocabulary: <pad>, </s>, <unk>, then "▁", every character of the corpus,
    every corpus word (with and without "▁") and its 2-letter pieces, scored by
    log-frequency (rounded, ties by text): deterministic, unlike the trainer."""
    freq = {}
    for line in CORPUS:
        for word in line.lower().split():
            for piece in {"▁" + word, word, *(word[i:i + n] for n in (1, 2) for i in range(len(word) - n + 1))}:
                freq[piece] = freq.get(piece, 0) + 1
    freq["▁"] = max(freq.values())
    total = sum(freq.values())
    scored = sorted(((p, round(math.log(c / total), 4)) for p, c in freq.items()), key=lambda x: (-x[1], x[0]))
    extra_ids = 4
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + scored
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]
    tok = T5Tokenizer(vocab=vocab, extra_ids=extra_ids, model_max_length=512)
    # SD3's real tokenizer_3 normalises with a SentencePiece charsmap; a NFKC + space squeeze
    # stands in for it (a tokenizer.json normalizer the Rust side must run).
    tok._tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    return tok, len(vocab)


def randomise(model, seed):
    """Re-draw every parameter (layer norms included) so no term is a constant."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 1 and ("norm" in name):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(p.shape[-1], 1) ** 0.5)
    return model


def main():
    torch.manual_seed(0)
    for sub in ["text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"]:
        if (TINY / sub).exists():
            shutil.rmtree(TINY / sub)
    REF.mkdir(parents=True, exist_ok=True)

    tok, tok_2, clip_vocab = make_clip_tokenizers()
    tok_3, t5_vocab = make_t5_tokenizer()
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    bos = tok.convert_tokens_to_ids("<|startoftext|>")
    assert eos == clip_vocab - 1 and tok_2.pad_token_id != eos

    clip_l = CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, layer_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    clip_g = CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=40, layer_norm_eps=1e-5,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=tok_2.pad_token_id,
    )
    t5 = T5Config(
        vocab_size=t5_vocab, d_model=88, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=20, dropout_rate=0.0,
        layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False,
    )
    te = randomise(CLIPTextModelWithProjection(clip_l), 1).eval()
    te_2 = randomise(CLIPTextModelWithProjection(clip_g), 2).eval()
    te_3 = randomise(T5EncoderModel(t5), 3).eval()

    for model, sub in [(te, "text_encoder"), (te_2, "text_encoder_2"), (te_3, "text_encoder_3")]:
        model.save_pretrained(TINY / sub, safe_serialization=True)
    for t, sub in [(tok, "tokenizer"), (tok_2, "tokenizer_2"), (tok_3, "tokenizer_3")]:
        t.save_pretrained(TINY / sub)

    # Reload everything from disk, as a user of the folder would.
    te = CLIPTextModelWithProjection.from_pretrained(TINY / "text_encoder").eval()
    te_2 = CLIPTextModelWithProjection.from_pretrained(TINY / "text_encoder_2").eval()
    te_3 = T5EncoderModel.from_pretrained(TINY / "text_encoder_3").eval()
    tok = CLIPTokenizer.from_pretrained(TINY / "tokenizer")
    tok_2 = CLIPTokenizer.from_pretrained(TINY / "tokenizer_2")
    tok_3 = T5Tokenizer.from_pretrained(TINY / "tokenizer_3")
    assert tok_2.pad_token == "!" and tok.pad_token == "<|endoftext|>"

    pipe = StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None,
        text_encoder=te, tokenizer=tok, text_encoder_2=te_2, tokenizer_2=tok_2,
        text_encoder_3=te_3, tokenizer_3=tok_3,
    )
    assert pipe.tokenizer_max_length == 77

    out = {}
    with torch.no_grad():
        ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        ids_2 = tok_2(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        ids_3 = tok_3(PROMPTS, padding="max_length", max_length=T5_MAX_LEN, truncation=True,
                      add_special_tokens=True, return_tensors="pt").input_ids
        untruncated = tok(PROMPTS[-1:], return_tensors="pt").input_ids
        assert untruncated.shape[-1] > 77, untruncated.shape
        untruncated_3 = tok_3(PROMPTS[-1:], return_tensors="pt").input_ids
        assert untruncated_3.shape[-1] > T5_MAX_LEN, untruncated_3.shape
        unk3 = tok_3.unk_token_id
        assert (ids_3[2] == unk3).any(), "the non-ASCII prompt should exercise T5's <unk>"
        out["clip_l.input_ids"] = ids.to(torch.int64)
        out["clip_g.input_ids"] = ids_2.to(torch.int64)
        out["t5.input_ids"] = ids_3.to(torch.int64)

        for name, model, i in [("clip_l", te, ids), ("clip_g", te_2, ids_2)]:
            o = model(i, output_hidden_states=True)
            out[f"{name}.penultimate"] = o.hidden_states[-2].contiguous()
            out[f"{name}.pooled"] = o.text_embeds.contiguous()
        out["t5.last_hidden_state"] = te_3(ids_3)[0].contiguous()

        pe, ne, pp, npool = pipe.encode_prompt(
            prompt=PROMPTS, prompt_2=None, prompt_3=None, device=torch.device("cpu"),
            do_classifier_free_guidance=True, negative_prompt=None, max_sequence_length=T5_MAX_LEN,
        )
        out["sd3.prompt_embeds"] = pe.contiguous()
        out["sd3.pooled_prompt_embeds"] = pp.contiguous()
        # The negative prompt "" is the same for every row: keep one.
        torch.testing.assert_close(ne, ne[:1].expand_as(ne), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(npool, npool[:1].expand_as(npool), rtol=1e-5, atol=1e-6)
        out["sd3.negative_prompt_embeds"] = ne[:1].contiguous()
        out["sd3.negative_pooled_prompt_embeds"] = npool[:1].contiguous()

    assert pe.shape == (len(PROMPTS), 77 + T5_MAX_LEN, 88), pe.shape
    assert pp.shape == (len(PROMPTS), 32 + 40), pp.shape
    # The pipeline's own pieces agree with the direct encoder calls.
    torch.testing.assert_close(pe[:, :77, :32], out["clip_l.penultimate"], rtol=0, atol=0)
    torch.testing.assert_close(pe[:, :77, 80:], torch.zeros(len(PROMPTS), 77, 8), rtol=0, atol=0)
    torch.testing.assert_close(pe[:, 77:], out["t5.last_hidden_state"], rtol=0, atol=0)

    save_file(out, str(REF / "reference.safetensors"), metadata={"format": "pt"})
    (REF / "reference.json").write_text(
        json.dumps({"prompts": PROMPTS, "t5_max_sequence_length": T5_MAX_LEN, "negative_prompt": ""},
                   ensure_ascii=False, indent=2) + "\n"
    )
    total = sum(f.stat().st_size for d in [TINY, REF] for f in d.rglob("*") if f.is_file()
                if "text" in str(f.relative_to(ROOT)) or "tokenizer" in str(f.relative_to(ROOT)))
    print(f"wrote {TINY} and {REF}: {total / 1e6:.2f} MB")
    for k, v in out.items():
        print(f"  {k}: {tuple(v.shape)} {v.dtype}")
    print("ids[2] (non-ASCII):", ids[2][:16].tolist(), ids_3[2][:16].tolist())


if __name__ == "__main__":
    sys.exit(main())
