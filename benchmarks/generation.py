"""Generation speed on SmolLM2-135M-Instruct (CPU): minitune's KV-cache `generate` vs transformers'
`generate`, same prompts, greedy, same max_new_tokens, in one run.

    python benchmarks/generation.py [--batch 8] [--new 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

PROMPTS = ["Write a short poem about autumn.", "Explain what a hash table is.", "Give me three tips for sleeping well.",
           "What is the capital of Australia?", "Describe a cat to someone who has never seen one.",
           "How do airplanes stay in the air?", "Summarize the plot of Romeo and Juliet.", "List five fruits."]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from minitune import generate, load_model, load_tokenizer
    from minitune.demo_model import demo_model_path
    from minitune.generate import left_pad

    path = demo_model_path()
    tok = load_tokenizer(path)
    ours = load_model(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
             for p in (PROMPTS * 4)[: a.batch]]
    ids, mask = left_pad(tok.encode_batch(texts), tok.pad_id)

    def run_ours():
        out = generate(ours, ids, mask, max_new_tokens=a.new, eos_ids=[], pad_id=tok.pad_id)  # no early stop: same work
        return int(out.mask.sum())

    def run_hf():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False,
                              pad_token_id=tok.pad_id)
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    rows = []
    for name, fn in [("minitune", run_ours), ("transformers", run_hf)]:
        fn()  # warm-up
        rates = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            n = fn()
            rates.append(n / (time.perf_counter() - t0))
        rows.append({"library": name, "batch": a.batch, "new tokens": a.new, "tokens/s": statistics.median(rates)})
    rows.append({"library": "minitune / transformers", "tokens/s": rows[0]["tokens/s"] / rows[1]["tokens/s"]})
    save("generation_smollm2_cpu", rows, ["library", "batch", "new tokens", "tokens/s"],
         "python benchmarks/generation.py " + " ".join(sys.argv[1:] if argv is None else argv), a.out)
    return rows


if __name__ == "__main__":
    main()
