"""Chat with a base model plus an optional LoRA adapter.

    python recipes/generate.py --model demo --adapter outputs/lora_sft/adapter --prompt "What is 12 + 30?"
    python recipes/generate.py --model demo            # interactive: one prompt per line, empty line quits
"""
from __future__ import annotations

import argparse
import sys

import torch

from minitune.adapters import load_adapter
from minitune.checkpoint import load_model
from minitune.errors import MinituneError
from minitune.generate import generate
from minitune.tokenizer import load_tokenizer
from minitune.train.setup import model_path


def reply(model, tok, messages, args) -> str:
    text = tok.apply_chat_template(messages, add_generation_prompt=True) if tok.chat_template else messages[-1]["content"]
    ids = torch.tensor([tok.encode(text)])
    g = torch.Generator().manual_seed(args.seed)
    out = generate(model, ids, max_new_tokens=args.max_new_tokens, eos_ids=tok.eos_ids, pad_id=tok.pad_id,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=g)
    return tok.decode(out.tokens[0, : int(out.lengths[0])])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="chat with a model (and an optional LoRA adapter)")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--prompt", default=None, help="one prompt; without it, read prompts from stdin")
    ap.add_argument("--system", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        path = model_path(args.model)
        model, tok = load_model(path), load_tokenizer(path)
        if args.adapter:
            load_adapter(model, args.adapter)
        history = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [args.prompt] if args.prompt is not None else iter(lambda: input("> "), "")
        for prompt in prompts:
            history.append({"role": "user", "content": prompt})
            answer = reply(model, tok, history, args)
            history.append({"role": "assistant", "content": answer})
            print(answer, flush=True)
    except (EOFError, KeyboardInterrupt):
        return 0
    except MinituneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
