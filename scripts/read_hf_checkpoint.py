#!/usr/bin/env python3
"""Read a Hugging Face layout LLaMA checkpoint with numpy alone, as an outside reader would.

Usage: read_hf_checkpoint.py DIR

Reads DIR/config.json and DIR/model.safetensors (or the files listed in
model.safetensors.index.json), parses every safetensors header itself, widens F32, BF16 and F16
tensors to float32, checks that every tensor's dtype is the config's `torch_dtype`, and runs the
numpy reference forward of scripts/make_tiny_llama.py on a fixed token sequence. Prints one JSON
object: torch_dtype, {name: [dtype, shape]} and the logits' shape and finiteness. Exits 1 with a
message naming the file when the checkpoint is malformed.
"""
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tiny_llama import forward  # noqa: E402

TORCH_TO_ST = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def widen(dtype, raw):
    if dtype == "F32":
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if dtype == "F16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    if dtype == "BF16":
        # bfloat16 is the top half of an IEEE float32.
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32)
    raise ValueError(f"unsupported dtype {dtype}")


def read_file(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        values = widen(meta["dtype"], body[start:end])
        out[name] = (meta["dtype"], meta["shape"], values.reshape(meta["shape"]))
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    root = sys.argv[1]
    with open(os.path.join(root, "config.json")) as f:
        cfg = json.load(f)
    index = os.path.join(root, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        try:
            tensors.update(read_file(os.path.join(root, name)))
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"{os.path.join(root, name)}: {e}")
    want = TORCH_TO_ST.get(cfg.get("torch_dtype"))
    if want is None:
        sys.exit(f"{root}/config.json: torch_dtype {cfg.get('torch_dtype')!r} is not known")
    wrong = [n for n, (dt, _, _) in tensors.items() if dt != want]
    if wrong:
        sys.exit(f"{root}: tensors {wrong[:3]} are not {want} as config.json says")
    weights = {n: v for n, (_, _, v) in tensors.items()}
    tokens = np.arange(8).reshape(1, 8) % cfg["vocab_size"]
    logits = forward(cfg, weights, tokens)
    print(json.dumps({
        "torch_dtype": cfg["torch_dtype"],
        "tensors": {n: [dt, shape] for n, (dt, shape, _) in sorted(tensors.items())},
        "logits_shape": list(logits.shape),
        "logits_finite": bool(np.isfinite(logits).all()),
    }))


if __name__ == "__main__":
    main()
