"""Exact-match accuracy of greedy answers on synthetic-task prompts (used by SFT and PPO)."""
from __future__ import annotations

from typing import Callable

import torch

from minitune.data.synthetic import correctness_reward, is_correct
from minitune.generate import generate, left_pad


@torch.no_grad()
def greedy_answers(model, tok, examples: list[dict], *, max_new_tokens: int = 32, batch_size: int = 50,
                   device=None) -> list[str]:
    """The greedy answer to each example with `messages` (system + user first), in eval mode."""
    was_training = model.training
    model.eval()
    prompts = [tok.encode(tok.apply_chat_template(ex["messages"][:2], add_generation_prompt=True)) for ex in examples]
    answers = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[i: i + batch_size], tok.pad_id, device)
        out = generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_ids=tok.eos_ids, pad_id=tok.pad_id)
        answers += [tok.decode(t[: int(n)]) for t, n in zip(out.tokens, out.lengths)]
    model.train(was_training)
    return answers


def greedy_accuracy(model, tok, examples: list[dict], *, max_new_tokens: int = 32, batch_size: int = 50,
                    device=None) -> tuple[float, list[tuple[str, str, str]]]:
    """(share of exactly correct greedy answers, [(prompt, answer, reference)]) for examples with
    `messages` (system + user first) and `answer`."""
    answers = greedy_answers(model, tok, examples, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)
    correct = [is_correct(a, ex["answer"]) for a, ex in zip(answers, examples)]
    return sum(correct) / max(len(correct), 1), [(ex["prompt"], a, ex["answer"]) for ex, a in zip(examples, answers)]


def exact_match_report(model, tok, examples: list[dict], *, max_new_tokens: int = 32,
                       device=None) -> tuple[dict[str, float], list[dict]]:
    """({"exact_match": share, "exact_match_<family>": share per family ("add", "sort", ...)}, one row
    per example with prompt, answer, reference, family and correct) of greedy answers: the held-out
    check the RL recipes run at the start, every run.eval_every steps and at the end."""
    answers = greedy_answers(model, tok, examples, max_new_tokens=max_new_tokens, device=device)
    rows = [{"prompt": ex["prompt"], "answer": a, "reference": ex["answer"], "family": ex.get("family", "all"),
             "correct": is_correct(a, ex["answer"])} for ex, a in zip(examples, answers)]
    by_family: dict[str, list[bool]] = {}
    for r in rows:
        by_family.setdefault(r["family"], []).append(r["correct"])
    report = {"exact_match": sum(r["correct"] for r in rows) / max(len(rows), 1),
              **{f"exact_match_{f}": sum(h) / len(h) for f, h in sorted(by_family.items())}}
    return report, rows


def format_report(report: dict[str, float]) -> str:
    """"0.630 (add 0.55, convert 0.38, ...)" for a printed line."""
    families = ", ".join(f"{k.removeprefix('exact_match_')} {v:.2f}" for k, v in report.items() if k != "exact_match")
    return f"{report['exact_match']:.3f}" + (f" ({families})" if families else "")


def headroom_report(examples: list[dict], greedy: list[str], samples: list[list[str]],
                    reward: Callable[[list[str], list[str]], list[float]] | None = None) -> dict[str, dict[str, float]]:
    """What RL from exact-match rewards can gain on these prompts, per family and "all": each
    example's greedy answer and k sampled answers give
      greedy       share answered right greedily (the held-out metric)
      pass_at_k    share with at least one right sample: the ceiling of sharpening alone
      sample_mean  share of samples that are right
      fixable      greedy wrong, some sample right: where a group-relative update can move greedy
      stuck        greedy wrong, no sample right: exact-match gives these prompts no gradient
      signal       share of groups whose samples' rewards (`reward`, default exact-match) differ:
                   the groups GRPO updates on."""
    if not (len(examples) == len(greedy) == len(samples)):
        raise ValueError(f"{len(examples)} examples, {len(greedy)} greedy answers, {len(samples)} sample lists")
    reward = reward or correctness_reward
    rows: dict[str, list[dict[str, float]]] = {}
    for ex, g, ss in zip(examples, greedy, samples):
        right = [is_correct(s, ex["answer"]) for s in ss]
        scores = reward(list(ss), [ex["answer"]] * len(ss))
        g_ok = is_correct(g, ex["answer"])
        row = {"greedy": float(g_ok), "pass_at_k": float(any(right)), "sample_mean": sum(right) / max(len(right), 1),
               "fixable": float(not g_ok and any(right)), "stuck": float(not g_ok and not any(right)),
               "signal": float(len(set(scores)) > 1)}
        for key in {ex.get("family", "all"), "all"}:
            rows.setdefault(key, []).append(row)
    return {fam: {"prompts": len(rs), **{k: sum(r[k] for r in rs) / len(rs) for k in rs[0]}}
            for fam, rs in sorted(rows.items(), key=lambda kv: (kv[0] == "all", kv[0]))}
