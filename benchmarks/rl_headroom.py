"""What RL with an exact-match reward can gain from a start adapter, before spending a run on it:
greedy accuracy, pass@k, and how many wrong greedy answers have a right sample (fixable by
sharpening) or none (stuck: no gradient), per family of the synthetic task's held-out prompts.

    python benchmarks/rl_headroom.py                        # the SFT default's adapter, 200 held-out prompts, 8 samples at T 0.7
    python benchmarks/rl_headroom.py --adapter outputs/grpo/adapter --samples 16

`signal` is the share of prompts whose k samples do not all score alike: the GRPO groups that carry
a gradient, under exact match and under `partial_credit_reward`. Writes
benchmarks/results/rl_headroom_synthetic_cpu.{md,json} and prints a few stuck prompts.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", default="outputs/lora_sft/adapter",
                    help="a PEFT adapter folder on the demo model ('': the bare model)")
    ap.add_argument("--prompts", type=int, default=200, help="held-out prompts (the RL recipes' held-out set)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--batch", type=int, default=25, help="prompts per generate call")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import torch

    from minitune.adapters import load_adapter
    from minitune.data.synthetic import SYSTEM, is_correct, partial_credit_reward, train_eval_split
    from minitune.evaluation import headroom_report
    from minitune.lora import set_adapter
    from minitune.rollout import sample_rollout
    from minitune.tokenizer import load_tokenizer
    from minitune.train.sections import GenSection, ModelSection
    from minitune.train.setup import build_base, model_path

    if a.adapter and not (Path(a.adapter) / "adapter_config.json").exists():
        sys.exit(f"--adapter {a.adapter}: no adapter_config.json there; run python recipes/lora_sft.py first")
    torch.manual_seed(0)
    model = build_base(ModelSection(), torch.device("cpu"))
    if a.adapter:
        load_adapter(model, Path(a.adapter), "policy", trainable=False)
        set_adapter(model, "policy")
    tok = load_tokenizer(model_path("demo"))
    _, held_out = train_eval_split(2000, a.prompts)
    sample_gen = GenSection.synthetic(a.temperature)
    greedy_gen = sample_gen.greedy()
    rng, greedy, samples = random.Random(0), [], []
    for s in range(0, len(held_out), a.batch):
        chunk = held_out[s: s + a.batch]
        args = dict(rng=rng, chat=True, system=SYSTEM, device=None)
        p, r = [ex["prompt"] for ex in chunk], [ex["answer"] for ex in chunk]
        greedy += sample_rollout(model, tok, p, r, gen=greedy_gen, k=1, **args).responses
        ro = sample_rollout(model, tok, p, r, gen=sample_gen, k=a.samples, **args)
        samples += [ro.responses[i * a.samples: (i + 1) * a.samples] for i in range(len(chunk))]
    exact = headroom_report(held_out, greedy, samples)
    partial = headroom_report(held_out, greedy, samples, reward=partial_credit_reward)
    rows = [{"family": fam, **st, "signal_partial": partial[fam]["signal"]}
            for fam, st in exact.items()]
    cols = ["family", "prompts", "greedy", "pass_at_k", "sample_mean", "fixable", "stuck", "signal",
            "signal_partial"]
    cmd = "python benchmarks/rl_headroom.py " + " ".join(sys.argv[1:] if argv is None else argv)
    save("rl_headroom_synthetic_cpu", rows, cols,
         f"{cmd} (k = {a.samples}, T = {a.temperature}, {a.adapter or 'the bare model'})", a.out)
    stuck = [(ex, g, ss) for ex, g, ss in zip(held_out, greedy, samples)
             if not any(is_correct(s, ex["answer"]) for s in ss + [g])]
    print(f"\n{len(stuck)} stuck prompts; a few:")
    for ex, g, ss in stuck[:: max(1, len(stuck) // 8)][:8]:
        print(f"  {ex['prompt']!r} -> greedy {g.strip()!r}, reference {ex['answer']!r}, samples "
              f"{sorted(set(s.strip() for s in ss))[:3]}")
    return rows


if __name__ == "__main__":
    main()
