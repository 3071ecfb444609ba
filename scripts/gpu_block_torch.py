#!/usr/bin/env python3
"""Time one LLaMA decoder block, forward + backward in bf16, with PyTorch on cuda:0.

Usage: gpu_block_torch.py [--hidden 8192] [--intermediate 28672] [--heads 64] [--kv-heads 8]
                          [--seq 2048] [--iters 10]

The block is LLaMA's (RMSNorm, grouped-query attention with rotate-half RoPE through
F.scaled_dot_product_attention with a causal mask, SwiGLU MLP), every weight in bf16 and trained
(requires_grad), batch 1. `segprop-bench gpu-check` runs the same shape on burn-cuda and prints
the ratio. Prints one JSON object: median_ms, torch, device.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def rms(x, w, eps=1e-5):
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(var + eps)).to(x.dtype) * w


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--intermediate", type=int, default=28672)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    dev = torch.device("cuda:0")
    dt = torch.bfloat16
    h, i, nh, nkv, s = a.hidden, a.intermediate, a.heads, a.kv_heads, a.seq
    hd = h // nh
    g = torch.Generator(device=dev).manual_seed(0)

    def weight(*shape):
        return (torch.randn(*shape, device=dev, generator=g) * 0.02).to(dt).requires_grad_()

    w = {
        "q": weight(h, h), "k": weight(nkv * hd, h), "v": weight(nkv * hd, h), "o": weight(h, h),
        "gate": weight(i, h), "up": weight(i, h), "down": weight(h, i),
        "n1": torch.ones(h, device=dev, dtype=dt, requires_grad=True),
        "n2": torch.ones(h, device=dev, dtype=dt, requires_grad=True),
    }
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, device=dev).float() / hd))
    ang = torch.arange(s, device=dev).float()[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().to(dt), emb.sin().to(dt)

    def rope(t):
        rot = torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1)
        return t * cos + rot * sin

    def block(x):
        y = rms(x, w["n1"])
        q = (y @ w["q"].T).view(1, s, nh, hd).transpose(1, 2)
        k = (y @ w["k"].T).view(1, s, nkv, hd).transpose(1, 2)
        v = (y @ w["v"].T).view(1, s, nkv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + o.transpose(1, 2).reshape(1, s, h) @ w["o"].T
        y = rms(x, w["n2"])
        return x + (F.silu(y @ w["gate"].T) * (y @ w["up"].T)) @ w["down"].T

    x = torch.randn(1, s, h, device=dev, dtype=dt, requires_grad=True)
    times = []
    for it in range(a.iters + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        block(x).sum().backward()
        torch.cuda.synchronize()
        if it >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    print(json.dumps({
        "median_ms": times[len(times) // 2],
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0),
    }))


if __name__ == "__main__":
    main()
