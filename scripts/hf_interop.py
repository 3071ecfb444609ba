#!/usr/bin/env python3
"""Independent Hugging Face reference for segprop's checkpoint interop and instruction-tuning tests.

Usage:
  hf_interop.py tokenizer OUT_DIR --corpus FILE [--vocab 384] [--max-lines 4000]
  hf_interop.py make OUT_DIR --arch llama|mistral [--head-dim N] [--tied] [--tokenizer DIR]
                [--vocab N] [--seed 0]
  hf_interop.py eval-loss MODEL_DIR --data FILE --format text|chat --seq-len T --batch-size B
                --eval-fraction F [--max-batches M] [--max-tokens K] [--packing true|false]
  hf_interop.py logits MODEL_DIR --tokens JSON

`tokenizer` trains a byte-level BPE tokenizer with the `tokenizers` library on the first
--max-lines lines of FILE (0 = all; blank ones skipped) and writes tokenizer.json,
tokenizer_config.json (with a Llama-3 style chat template) and generation_config.json. Special
tokens get ids 0.. in the order <|begin_of_text|>, <|end_of_text|>, <|eot_id|>,
<|start_header_id|>, <|end_header_id|>; single sequences are encoded with one <|begin_of_text|> in
front. Prints {"vocab_size": N}.

`make` builds a small random LlamaForCausalLM or MistralForCausalLM with transformers (float32,
CPU, seeded), saves it with save_pretrained (safetensors), copies the tokenizer files in when
--tokenizer is given, and writes reference.json with fixed tokens [2][12] and the model's logits
[2][12][vocab]. The saved directory is reloaded with from_pretrained and must give the same logits.

`eval-loss` loads MODEL_DIR with AutoModelForCausalLM and prints the token-weighted mean held-out
cross-entropy as {"loss", "tokens", "batches", "sequences"}: tokens is the number of counted
targets, batches and sequences what was evaluated (--packing defaults to true). The rules, which
segprop implements independently, are:
  text: the whole file, encoded with the post-processor (one BOS in front), cut to --max-tokens if
    > 0; every target counts.
  chat: JSONL, blank lines skipped; each line has "messages" or "prompt"/"completion". The example
    is rendered by HF's apply_chat_template; assistant message i spans the characters
    [len(render(messages[:i], generation prompt)), len(render(messages[:i+1]))). The render is
    encoded without special tokens; a token is trainable iff its character offset start lies in
    an assistant span. With packing the examples are concatenated into one stream; without it
    each example is one row of exactly T+1 tokens (cut, or padded with the untrainable pad id).
  A stream gives the windows stream[k*T : k*T+T+1] that fit. Window inputs are s[0:T], targets
    s[1:T+1]; target j counts iff token j+1 is trainable. The last ceil(n * F) sequences are held
    out, taken in batches of B in order (partial batch dropped), at most --max-batches if > 0.
  The loss is computed in float64 from float32 logits.

`logits` prints {"logits": [b][t][vocab]} for token ids given as a JSON list of lists (inline or a
file name).

Errors go to stderr with exit status 2 and a message naming the file.
"""
import argparse
import json
import math
import os
import shutil
import sys

import numpy as np

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
            "<|start_header_id|>", "<|end_header_id|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_text(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"{path}: {e}")


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{path}: {e}")


def write_json(path, obj, indent=2):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def load_tokenizer(directory):
    from tokenizers import Tokenizer
    path = os.path.join(directory, "tokenizer.json")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises plain Exception on parse errors
        fail(f"{path}: {e}")


# ---------------------------------------------------------------- tokenizer

def cmd_tokenizer(args):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    lines = read_text(args.corpus).split("\n")
    if args.max_lines > 0:
        lines = lines[: args.max_lines]
    lines = [line.rstrip("\r") for line in lines if line.strip()]
    if not lines:
        fail(f"{args.corpus}: no text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    bos = tok.token_to_id(SPECIALS[0])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIALS[0]} $A", pair=f"{SPECIALS[0]} $A {SPECIALS[0]}:1 $B:1",
        special_tokens=[(SPECIALS[0], bos)])
    for i, name in enumerate(SPECIALS):
        if tok.token_to_id(name) != i:
            fail(f"{args.corpus}: special token {name} did not get id {i}")
    os.makedirs(args.out, exist_ok=True)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    write_json(os.path.join(args.out, "tokenizer_config.json"), {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "pad_token": "<|end_of_text|>", "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 256, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE})
    write_json(os.path.join(args.out, "generation_config.json"), {
        "bos_token_id": bos, "eos_token_id": tok.token_to_id("<|eot_id|>")})
    print(json.dumps({"vocab_size": tok.get_vocab_size(with_added_tokens=True)}))


# ---------------------------------------------------------------- model

def forward_logits(model, tokens):
    import torch
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.float()


def cmd_make(args):
    import torch
    from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM)
    gen = None
    if args.tokenizer:
        gen = read_json(os.path.join(args.tokenizer, "generation_config.json"))
    if args.vocab is not None:
        vocab = args.vocab
    elif args.tokenizer:
        vocab = load_tokenizer(args.tokenizer).get_vocab_size(with_added_tokens=True)
    else:
        vocab = 96
    kw = dict(vocab_size=vocab, hidden_size=32, intermediate_size=80, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, rope_theta=10000.0, initializer_range=0.1,
              tie_word_embeddings=args.tied)
    if args.head_dim is not None:
        kw["head_dim"] = args.head_dim
    if gen is not None:
        kw.update(bos_token_id=gen.get("bos_token_id"), eos_token_id=gen.get("eos_token_id"))
    if args.arch == "llama":
        cls, config = LlamaForCausalLM, LlamaConfig(**kw)
    else:
        cls, config = MistralForCausalLM, MistralConfig(sliding_window=None, **kw)
    torch.manual_seed(args.seed)
    model = cls(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.eval()
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    if args.tokenizer:
        for name in TOKENIZER_FILES:
            src = os.path.join(args.tokenizer, name)
            if not os.path.exists(src):
                fail(f"{src}: missing")
            shutil.copyfile(src, os.path.join(args.out, name))
    tokens = np.random.RandomState(args.seed + 1).randint(0, vocab, size=(2, 12))
    logits = forward_logits(model, tokens)
    write_json(os.path.join(args.out, "reference.json"),
               {"tokens": tokens.tolist(), "logits": logits.numpy().tolist()}, indent=None)
    reloaded = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    diff = (forward_logits(reloaded, tokens) - logits).abs().max().item()
    if not diff < 1e-6:
        fail(f"{args.out}: reloaded model differs from the saved one by {diff}")
    print(json.dumps({"dir": args.out, "vocab_size": vocab, "head_dim": config.head_dim,
                      "tied": bool(args.tied)}))


def load_model(directory):
    import torch
    from transformers import AutoModelForCausalLM
    if not os.path.exists(os.path.join(directory, "config.json")):
        fail(f"{os.path.join(directory, 'config.json')}: missing")
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    except Exception as e:
        fail(f"{directory}: cannot load model: {e}")
    return model.eval()


def cmd_logits(args):
    spec = args.tokens if args.tokens.lstrip().startswith("[") else read_text(args.tokens)
    try:
        tokens = json.loads(spec)
    except ValueError as e:
        fail(f"{args.tokens}: {e}")
    model = load_model(args.model)
    print(json.dumps({"logits": forward_logits(model, tokens).numpy().tolist()}))


# ---------------------------------------------------------------- eval-loss

def chat_examples(path):
    examples = []
    for n, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            fail(f"{where}: {e}")
        if not isinstance(obj, dict):
            fail(f"{where}: not a JSON object")
        if "messages" in obj:
            msgs = obj["messages"]
            if not isinstance(msgs, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str) for m in msgs):
                fail(f"{where}: \"messages\" must be a list of {{role, content}} strings")
        elif isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
            msgs = [{"role": "user", "content": obj["prompt"]},
                    {"role": "assistant", "content": obj["completion"]}]
        else:
            fail(f"{where}: needs \"messages\" or \"prompt\" and \"completion\" strings")
        examples.append((where, [{"role": m["role"], "content": m["content"]} for m in msgs]))
    return examples


def chat_tokens(directory, tok, examples):
    """Per example: (ids, trainable flags) from HF's rendering of the chat template."""
    from transformers import PreTrainedTokenizerFast
    cfg = read_json(os.path.join(directory, "tokenizer_config.json"))
    if not cfg.get("chat_template"):
        fail(f"{os.path.join(directory, 'tokenizer_config.json')}: no chat_template")
    hf = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(directory, "tokenizer.json"),
        **{k: cfg[k] for k in ("bos_token", "eos_token", "pad_token") if k in cfg})
    hf.chat_template = cfg["chat_template"]

    def render(msgs, prompt=False):
        # The batched form: HF refuses an empty conversation, which messages[:0] is when an
        # example opens with an assistant message, but renders an empty one inside a batch.
        return hf.apply_chat_template([msgs], add_generation_prompt=prompt, tokenize=False)[0]

    out = []
    for where, msgs in examples:
        try:
            full = render(msgs)
            spans = [(len(render(msgs[:i], True)), len(render(msgs[: i + 1])))
                     for i, m in enumerate(msgs) if m["role"] == "assistant"]
        except Exception as e:
            fail(f"{where}: chat template: {e}")
        enc = tok.encode(full, add_special_tokens=False)
        flags = [any(a <= s < b for a, b in spans) for s, _ in enc.offsets]
        out.append((list(enc.ids), flags))
    return out


def windows(stream, flags, t):
    # i + t + 1 <= len(stream) for every i in the range: the last partial window is dropped
    return [(stream[i: i + t + 1], flags[i: i + t + 1]) for i in range(0, len(stream) - t, t)]


def cmd_eval_loss(args):
    import torch
    t, b = args.seq_len, args.batch_size
    if t < 1 or b < 1 or not 0 < args.eval_fraction <= 1:
        fail(f"{args.data}: need --seq-len >= 1, --batch-size >= 1, 0 < --eval-fraction <= 1")
    tok = load_tokenizer(args.model)
    if args.format == "text":
        ids = tok.encode(read_text(args.data), add_special_tokens=True).ids
        if args.max_tokens > 0:
            ids = ids[: args.max_tokens]
        seqs = windows(ids, [True] * len(ids), t)
    else:
        examples = chat_tokens(args.model, tok, chat_examples(args.data))
        if not any(any(f) for _, f in examples):
            fail(f"{args.data}: no trainable token")
        if args.packing:
            ids = [i for e, _ in examples for i in e]
            flags = [f for _, fl in examples for f in fl]
            seqs = windows(ids, flags, t)
        else:
            cfg = read_json(os.path.join(args.model, "tokenizer_config.json"))
            pad_name = cfg.get("pad_token") or cfg.get("eos_token")
            pad = tok.token_to_id(pad_name) if isinstance(pad_name, str) else None
            if pad is None:
                fail(f"{os.path.join(args.model, 'tokenizer_config.json')}: no pad or eos token")
            seqs = []
            for e, fl in examples:
                e, fl = e[: t + 1], fl[: t + 1]
                n = t + 1 - len(e)
                seqs.append((e + [pad] * n, fl + [False] * n))
    num_eval = math.ceil(float(len(seqs)) * args.eval_fraction)
    held = seqs[len(seqs) - num_eval:] if num_eval > 0 else []
    batches = [held[i: i + b] for i in range(0, len(held) - b + 1, b)]
    if args.max_batches > 0:
        batches = batches[: args.max_batches]
    if not batches:
        fail(f"{args.data}: {len(seqs)} sequences leave no full held-out batch of {b}")
    if not any(f for batch in batches for _, fl in batch for f in fl[1:]):
        fail(f"{args.data}: no trainable token in the held-out batches")
    model = load_model(args.model)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            x = torch.tensor([s for s, _ in batch], dtype=torch.long)
            mask = torch.tensor([fl[1:] for _, fl in batch], dtype=torch.bool)
            logits = model(input_ids=x[:, :-1]).logits.float()
            logp = torch.log_softmax(logits.double(), dim=-1)
            nll = -logp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)
            total += nll[mask].sum().item()
            count += int(mask.sum().item())
    print(json.dumps({"loss": total / count, "tokens": count, "batches": len(batches),
                      "sequences": len(batches) * b}))


# ---------------------------------------------------------------- main

def parse_bool(s):
    if s.lower() in ("true", "1", "yes"):
        return True
    if s.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    p.add_argument("out")
    p.add_argument("--corpus", required=True)
    p.add_argument("--vocab", type=int, default=384)
    p.add_argument("--max-lines", type=int, default=4000)
    p.set_defaults(fn=cmd_tokenizer)
    p = sub.add_parser("make", help="write a small random checkpoint and reference logits")
    p.add_argument("out")
    p.add_argument("--arch", choices=["llama", "mistral"], required=True)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--tied", action="store_true")
    p.add_argument("--tokenizer")
    p.add_argument("--vocab", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_make)
    p = sub.add_parser("eval-loss", help="held-out loss by segprop's rules")
    p.add_argument("model")
    p.add_argument("--data", required=True)
    p.add_argument("--format", choices=["text", "chat"], required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--eval-fraction", type=float, required=True)
    p.add_argument("--max-batches", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--packing", type=parse_bool, default=True)
    p.set_defaults(fn=cmd_eval_loss)
    p = sub.add_parser("logits", help="print a checkpoint's logits for given token ids")
    p.add_argument("model")
    p.add_argument("--tokens", required=True)
    p.set_defaults(fn=cmd_logits)
    args = ap.parse_args()
    if args.cmd != "tokenizer":
        from transformers.utils import logging
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    args.fn(args)


if __name__ == "__main__":
    main()
