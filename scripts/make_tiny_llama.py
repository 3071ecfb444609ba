#!/usr/bin/env python3
"""Write a tiny random LLaMA checkpoint in Hugging Face layout and a numpy reference forward.

Usage: make_tiny_llama.py OUT_DIR [--seed N] [--shards N] [--vocab N]

OUT_DIR gets config.json, model.safetensors (or sharded files + model.safetensors.index.json)
and reference.json with input tokens and the logits this script computes. The forward pass is an
independent numpy implementation of HF's LlamaForCausalLM (rotate_half RoPE with LLaMA-3
scaling, grouped-query attention, SwiGLU, RMSNorm), used by segprop's import tests.
"""
import argparse
import json
import math
import os
import struct

import numpy as np

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 80,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def random_weights(cfg, rng):
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    w = {"model.embed_tokens.weight": rng.normal(0, 1.0, (v, h)),
         "model.norm.weight": 1 + 0.1 * rng.normal(size=h),
         "lm_head.weight": rng.normal(0, 0.2, (v, h))}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}"
        w[f"{p}.input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=h)
        w[f"{p}.post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=h)
        w[f"{p}.self_attn.q_proj.weight"] = rng.normal(0, 0.2, (h, h))
        w[f"{p}.self_attn.k_proj.weight"] = rng.normal(0, 0.2, (kv, h))
        w[f"{p}.self_attn.v_proj.weight"] = rng.normal(0, 0.2, (kv, h))
        w[f"{p}.self_attn.o_proj.weight"] = rng.normal(0, 0.2, (h, h))
        w[f"{p}.mlp.gate_proj.weight"] = rng.normal(0, 0.2, (i, h))
        w[f"{p}.mlp.up_proj.weight"] = rng.normal(0, 0.2, (i, h))
        w[f"{p}.mlp.down_proj.weight"] = rng.normal(0, 0.2, (h, i))
    return {k: v.astype(np.float32) for k, v in w.items()}


def inv_freq(cfg):
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    freq = 1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    s = cfg.get("rope_scaling")
    if not s:
        return freq
    old = s["original_max_position_embeddings"]
    low_wl, high_wl = old / s["low_freq_factor"], old / s["high_freq_factor"]
    out = []
    for f in freq:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(f)
        elif wl > low_wl:
            out.append(f / s["factor"])
        else:
            smooth = (old / wl - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            out.append((1 - smooth) * f / s["factor"] + smooth * f)
    return np.array(out)


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def forward(cfg, w, tokens):
    x = w["model.embed_tokens.weight"][tokens].astype(np.float64)  # [b, t, h]
    b, t, h = x.shape
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = h // nh
    ang = np.arange(t)[:, None] * inv_freq(cfg)[None, :]
    emb = np.concatenate([ang, ang], -1)
    cos, sin = np.cos(emb), np.sin(emb)

    def rope(q):  # [b, heads, t, hd]
        rot = np.concatenate([-q[..., hd // 2:], q[..., : hd // 2]], -1)
        return q * cos + rot * sin

    mask = np.triu(np.full((t, t), -np.inf), 1)
    eps = cfg["rms_norm_eps"]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}"
        y = rms(x, w[f"{p}.input_layernorm.weight"], eps)
        q = (y @ w[f"{p}.self_attn.q_proj.weight"].T).reshape(b, t, nh, hd).transpose(0, 2, 1, 3)
        k = (y @ w[f"{p}.self_attn.k_proj.weight"].T).reshape(b, t, nkv, hd).transpose(0, 2, 1, 3)
        v = (y @ w[f"{p}.self_attn.v_proj.weight"].T).reshape(b, t, nkv, hd).transpose(0, 2, 1, 3)
        q, k = rope(q), rope(k)
        k = np.repeat(k, nh // nkv, axis=1)
        v = np.repeat(v, nh // nkv, axis=1)
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(0, 2, 1, 3).reshape(b, t, h)
        x = x + o @ w[f"{p}.self_attn.o_proj.weight"].T
        y = rms(x, w[f"{p}.post_attention_layernorm.weight"], eps)
        g = y @ w[f"{p}.mlp.gate_proj.weight"].T
        u = y @ w[f"{p}.mlp.up_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ w[f"{p}.mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"], eps)
    return x @ w["lm_head.weight"].T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=CONFIG["vocab_size"])
    args = ap.parse_args()
    CONFIG["vocab_size"] = args.vocab
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    w = random_weights(CONFIG, rng)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    if args.shards <= 1:
        write_safetensors(os.path.join(args.out, "model.safetensors"), w)
    else:
        names = sorted(w)
        weight_map = {}
        for s in range(args.shards):
            part = names[s :: args.shards]
            fname = f"model-{s + 1:05d}-of-{args.shards:05d}.safetensors"
            write_safetensors(os.path.join(args.out, fname), {n: w[n] for n in part})
            weight_map.update({n: fname for n in part})
        total = sum(a.nbytes for a in w.values())
        with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    tokens = rng.integers(0, CONFIG["vocab_size"], size=(2, 12))
    logits = forward(CONFIG, w, tokens)
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump({"tokens": tokens.tolist(), "logits": logits.reshape(-1).tolist(),
                   "shape": list(logits.shape)}, f)


if __name__ == "__main__":
    main()
