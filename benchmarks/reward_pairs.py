"""Reward-model training step on real preference pairs: minitune's shared-prompt layout vs the same
pairs as padded chosen/rejected rows (what minitune did before, and what TRL's RewardTrainer does),
and transformers+peft (AutoModelForSequenceClassification + LoRA) on those padded rows.

    python benchmarks/reward_pairs.py [--pairs 64] [--batch 8] [--max-length 256] [--rounds 2] [--no-hf]

hh-rlhf harmless pairs from ../shared/data (the reward recipe's training split), SmolLM2-135M-Instruct
(the demo model) in fp32, LoRA r=16 on all linear layers + a scalar head, AdamW, one step per batch
of `--batch` pairs. Each library/layout runs in its own process (clean peak RSS); `--rounds` repeats
them alternately and reports medians (this machine's speed drifts). The first batch is a warm-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_bytes, run_worker, save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def load_batches(a):
    """Batches of SharedPair token ids, in the order the reward recipe would draw them (seed 0)."""
    from minitune.data.shared_prompt import tokenize_shared_pair
    from minitune.data.preference import load_preference_pairs, pair_batches
    from minitune.demo_model import demo_model_path
    from minitune.tokenizer import load_tokenizer
    from minitune.train.sections import DataSection

    tok = load_tokenizer(demo_model_path())
    train, _, _ = load_preference_pairs(DataSection(source=str(DATA), hh_format=True, holdout=300), tok, 0)
    pairs = [tokenize_shared_pair(p, tok, a.max_length) for p in train[: a.pairs]]
    gen = pair_batches(pairs, a.batch, 0)
    return tok, [next(gen)[1] for _ in range(a.pairs // a.batch)]


def padded_rows(pairs, pad_id):
    """[2B, S] chosen rows then rejected rows (prompt + response each), padded, and the mask."""
    from minitune.generate import left_pad

    return left_pad([p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs], pad_id)


def worker(a) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    tok, batches = load_batches(a)
    from minitune.demo_model import demo_model_path

    if a.lib == "transformers+peft":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(demo_model_path(), num_labels=1, dtype=torch.float32,
                                                                   attn_implementation="sdpa")
        model.config.pad_token_id = tok.pad_id
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="SEQ_CLS"))

        def rewards(pairs):
            ids, mask = padded_rows(pairs, tok.pad_id)
            r = model(input_ids=ids, attention_mask=mask).logits[:, 0]
            return r[: len(pairs)], r[len(pairs):]
    else:
        from minitune import load_model
        from minitune.data.shared_prompt import layout_pairs
        from minitune.heads import WithHead
        from minitune.lora import LoRAConfig, apply_lora
        from minitune.reward import RewardHead, pair_rewards, sequence_rewards

        base = load_model(demo_model_path())
        apply_lora(base, LoRAConfig(r=16, alpha=32.0), "reward")
        model = WithHead(base, RewardHead(base.config.hidden_size))

        def rewards(pairs):
            if a.layout == "shared":
                return pair_rewards(model, None, layout_pairs(pairs, tok.pad_id))
            ids, mask = padded_rows(pairs, tok.pad_id)
            r = sequence_rewards(model, None, ids, mask)
            return r[: len(pairs)], r[len(pairs):]

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for i, pairs in enumerate(batches):
        t0 = time.perf_counter()
        c, r = rewards(pairs)
        loss = -F.logsigmoid(c - r).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first batch warms up
            times.append(time.perf_counter() - t0)
    measured = batches[1:]
    n_pairs = sum(len(b) for b in measured)
    real = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for b in measured for p in b)
    return {"pairs_per_s": n_pairs / sum(times), "tokens_per_s": real / sum(times), "s_per_batch": sum(times) / len(times),
            "peak_rss_gib": peak_rss_bytes() / 2**30}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers+peft")
    ap.add_argument("--out-dir", default="")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lib", default="minitune", help=argparse.SUPPRESS)
    ap.add_argument("--layout", default="shared", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.pairs < 2 * a.batch:
        ap.error("--pairs must hold at least two batches (the first is a warm-up)")
    if a.worker:
        print(json.dumps(worker(a)))
        return []
    runs = [("minitune", "shared prompt, packed"), ("minitune", "padded rows")]
    runs += [] if a.no_hf else [("transformers+peft", "padded rows")]
    common_args = ["--pairs", str(a.pairs), "--batch", str(a.batch), "--max-length", str(a.max_length)]
    results: dict = {r: [] for r in runs}
    for _ in range(a.rounds):
        for lib, layout in runs:
            args = common_args + ["--lib", lib, "--layout", "shared" if layout.startswith("shared") else "padded"]
            results[(lib, layout)].append(run_worker(Path(__file__), args))
            print(lib, layout, results[(lib, layout)][-1], flush=True)
    rows = []
    for (lib, layout), rs in results.items():
        rows.append({"library": lib, "layout": layout,
                     "pairs/s": statistics.median(r["pairs_per_s"] for r in rs),
                     "real tokens/s": statistics.median(r["tokens_per_s"] for r in rs),
                     "s/batch": statistics.median(r["s_per_batch"] for r in rs),
                     "peak RSS GiB": max(r["peak_rss_gib"] for r in rs)})
    ref = rows[-1]["pairs/s"]
    for r in rows:
        r["vs last row"] = f"{r['pairs/s'] / ref:.2f}x"
    command = "python benchmarks/reward_pairs.py " + " ".join(sys.argv[1:] if argv is None else argv)
    save(f"reward_pairs_hh_{a.max_length}_cpu", rows,
         ["library", "layout", "pairs/s", "real tokens/s", "s/batch", "peak RSS GiB", "vs last row"], command,
         Path(a.out_dir) if a.out_dir else None)
    return rows


if __name__ == "__main__":
    main()
