#!/usr/bin/env python3
"""Time LLaMA training steps on the CPU with PyTorch eager and transformers' LlamaForCausalLM.

Usage: cpu_step_torch.py [--hidden 256] [--layers 8] [--heads 8] [--kv-heads 2]
                         [--intermediate 688] [--vocab 512] [--batch 16] [--seq 128]
                         [--threads 2] [--warmup 2] [--steps 8] [--seed 0]

The reference for `segprop-bench throughput --peers`, which runs this script in rounds between
its own steps on the same shape: SDPA attention, f32, AdamW (lr 1e-3), e2e steps (forward,
cross-entropy over every position, backward, optimizer step) on fixed random batches. Needs the
PyPI packages `torch` and `transformers`. Prints one JSON object: the seconds of each timed
step, torch's version and its thread count.
"""
import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    config = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=a.seq,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [torch.randint(0, a.vocab, (a.batch, a.seq + 1)) for _ in range(4)]
    times = []
    for i in range(a.warmup + a.steps):
        tokens = batches[i % len(batches)]
        start = time.perf_counter()
        out = model(input_ids=tokens[:, :-1], labels=None)
        loss = torch.nn.functional.cross_entropy(
            out.logits.reshape(-1, a.vocab), tokens[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= a.warmup:
            times.append(time.perf_counter() - start)
    print(
        json.dumps(
            {"step_s": times, "torch": torch.__version__, "threads": torch.get_num_threads()}
        )
    )


if __name__ == "__main__":
    main()
