"""The RL recipes' held-out check (PPO, GRPO): the policy answers fixed prompts it never trains on,
greedily, at the start, every `run.eval_every` steps and at the end, so curves show generalization
rather than the practised pool. On the synthetic task that is exact-match accuracy (overall and per
family); elsewhere the answers are scored like rollouts (the reward adapter or function), and a
reader gets the score's mean, its spread and the no-EOS share. Either way the answers themselves go
to eval_samples/step_N.jsonl, so the prompts that changed between two steps can be read."""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Callable

import torch

from minitune.data.synthetic import train_eval_split
from minitune.evaluation import exact_match_report, format_report
from minitune.ppo import KLEstimator, kl_per_token, policy_forward
from minitune.rollout import (PromptSplit, empty_answers, prompts_system, prompts_use_chat, sample_rollout,
                              score_rollout)
from minitune.train.sections import GenSection


@torch.no_grad()
def held_out_scores(policy, tok, prompts: list[str], references: list, *, gen: GenSection, chat: bool,
                    system: str | None, reward_head=None, reward_fn: Callable | None = None, name: str = "",
                    device=None, batch_size: int = 25) -> tuple[dict[str, float], list[dict]]:
    """({"score_mean", "score_std", "no_eos_share", "stop_share", "empty_share", "response_length"}, one
    row per prompt with its greedy response, score, whether it ended (EOS or a `gen.stop` string) and whether a stop
    string ended it). no_eos_share counts answers the length budget cut off. The answers are greedy,
    `gen.max_new_tokens` long at most; the score is the reward adapter's (or function's) on the
    whole sequence."""
    greedy = gen.greedy()
    rng = random.Random(0)  # unused by greedy decoding, but sample_rollout draws from it
    rows: list[dict] = []
    for i in range(0, len(prompts), batch_size):
        ro = sample_rollout(policy, tok, prompts[i: i + batch_size], references[i: i + batch_size], gen=greedy, k=1,
                            rng=rng, chat=chat, system=system, device=device)
        scores = score_rollout(ro, policy, reward_head=reward_head, reward_fn=reward_fn, name=name, device=device)
        rows += [{"prompt": p, "response": r, "score": float(s), "ended": bool(e), "stopped": bool(st), "tokens": int(n)}
                 for p, r, s, e, st, n in zip(ro.prompts, ro.responses, scores.tolist(), ro.gen.ended.tolist(),
                                              ro.stopped.tolist(), ro.gen.lengths.tolist())]
    s = torch.tensor([r["score"] for r in rows], dtype=torch.float64)
    report = {"score_mean": s.mean().item(), "score_std": s.std().item() if len(rows) > 1 else 0.0,
              "no_eos_share": sum(not r["ended"] for r in rows) / len(rows),
              "stop_share": sum(r["stopped"] for r in rows) / len(rows),
              "empty_share": empty_answers([r["response"] for r in rows]).float().mean().item(),
              "response_length": sum(r["tokens"] for r in rows) / len(rows)}
    return report, rows


@torch.no_grad()
def answer_kls(policy, reference, tok, prompts: list[str], *, gen: GenSection, chat: bool, system: str | None,
               device=None, seed: int = 0, batch_size: int = 25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([n] exact KL per answer, [n] sampled-token log-ratio per answer, [n] answer lengths), float64:
    one answer per prompt sampled from the policy as rollouts are (`gen`: temperature, top-k/p, stop
    strings, gen.max_new_tokens new tokens; no greedy member) with a fixed seed, both distributions
    taken at gen.temperature, as the rollout KL is. The exact KL of the two next-token distributions,
    summed over the answer's positions, has the sequence KL as its mean (chain rule) with less variance
    than the log-ratio (the per-step rollout KL's estimator). `reference()` makes `policy` the reference."""
    g = dataclasses.replace(gen, min_new_tokens=gen.max_new_tokens, greedy_member=False)
    T = gen.temperature
    rng = random.Random(seed)
    full, sampled, length = [], [], []
    was_training = policy.training
    policy.eval()  # sample_rollout keeps the mode it finds
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i: i + batch_size]
        ro = sample_rollout(policy, tok, chunk, [None] * len(chunk), gen=g, k=1, rng=rng, chat=chat, system=system,
                            device=device)
        seq, mask, rmask = ro.gen.sequences, ro.attention_mask, ro.gen.mask
        logp, _, _, logits = policy_forward(policy, seq, mask, rmask, 1, T, values=False, with_logits=True)
        with reference():
            ref_logp, _, _, ref_logits = policy_forward(policy, seq, mask, rmask, 1, T, values=False, with_logits=True)
        m = rmask.double()
        full.append((kl_per_token(logp, ref_logp, KLEstimator.FULL, logits, ref_logits, T).double() * m).sum(1))
        sampled.append(((logp - ref_logp).double() * m).sum(1))
        length.append(m.sum(1))
    policy.train(was_training)
    return torch.cat(full).cpu(), torch.cat(sampled).cpu(), torch.cat(length).cpu()


def held_out_kl(policy, reference, tok, prompts: list[str], **kw) -> dict[str, float]:
    """{"kl", "kl_sampled", "kl_length"}: the means of `answer_kls` (same arguments) over the prompts."""
    full, sampled, length = answer_kls(policy, reference, tok, prompts, **kw)
    return {"kl": full.mean().item(), "kl_sampled": sampled.mean().item(), "kl_length": length.mean().item()}


def flips(before: list[bool], after: list[bool]) -> dict[str, float]:
    """{"gained": prompts wrong before and right after, "lost": right before and wrong after}. The net change
    is their difference; both together say how much of it is churn (an update that flips borderline
    prompts both ways) rather than a rule learnt."""
    return {"gained": float(sum(not b and a for b, a in zip(before, after))),
            "lost": float(sum(b and not a for b, a in zip(before, after)))}


class HeldOutEval:
    """Called with a step number: evaluates, logs `eval_*` metrics, prints one line, keeps the report.
    `cfg.held_out` (a HeldOutSection) sets the prompts, the answer budget and the KL measurement;
    `reference()` makes the policy the reference (for the KL). `summary()` gives the first and last
    reports and, for scores, the gain in units of the first evaluation's spread."""

    def __init__(self, policy, tok, split: PromptSplit, cfg, *, reward_head, reward_fn, out_dir: Path, log,
                 is_main: bool, device, reference=None):
        d, h = cfg.data, cfg.held_out
        self.policy, self.tok, self.device, self.log, self.is_main = policy, tok, device, log, is_main
        self.synthetic = d.source == "synthetic"
        self.max_new_tokens = h.max_new_tokens
        self.reports: dict[int, dict[str, float]] = {}
        self.rows: dict[int, list[dict]] = {}  # each evaluation's answers (also in eval_samples/step_N.jsonl)
        self.samples = out_dir / "eval_samples"
        n = h.prompts
        self.reference, self.kl_prompts = reference, min(h.kl_prompts, n)
        self.system = prompts_system(d)
        self.gen, self.chat = cfg.gen, prompts_use_chat(d)
        if self.synthetic:
            self.examples = train_eval_split(d.synthetic_train, d.synthetic_eval, seed=cfg.run.seed)[1][:n]
            self.size = len(self.examples)
        else:
            self.prompts, self.refs = split.held_out[:n], split.held_out_references[:n]
            self.size = len(self.prompts)
            self.kw = dict(gen=dataclasses.replace(cfg.gen, max_new_tokens=h.max_new_tokens), chat=self.chat,
                           system=None, reward_head=reward_head, reward_fn=reward_fn, name=cfg.reward.function,
                           device=device)

    def _first_correct(self) -> list[bool] | None:
        """Each prompt's correctness at step 0 (exact match, for `flips`): this run's evaluation, else the
        step-0 answers a resumed run wrote before it stopped; None without either."""
        if 0 not in self.rows:
            path = self.samples / "step_0.jsonl"
            if not path.exists():
                return None
            with open(path) as f:
                self.rows[0] = [json.loads(line) for line in f if line.strip()]
        return [bool(r["correct"]) for r in self.rows[0]]

    def __bool__(self) -> bool:
        return self.size > 0

    def __call__(self, step: int, title: str | None = None) -> dict[str, float]:
        """Evaluates at `step` (`title` names the evaluation in the printed line instead of the step)."""
        if self.synthetic:
            report, rows = exact_match_report(self.policy, self.tok, self.examples, max_new_tokens=self.max_new_tokens,
                                              device=self.device)
            line = f"greedy exact-match {format_report(report)}"
            correct = [bool(r["correct"]) for r in rows]
            first = self._first_correct() if step > 0 else None
            if first is not None and len(first) == len(correct):
                report |= flips(first, correct)
                line += f" ({report['gained']:.0f} prompts gained, {report['lost']:.0f} lost since step 0)"
        else:
            report, rows = held_out_scores(self.policy, self.tok, self.prompts, self.refs, **self.kw)
            line = (f"greedy answers' score {report['score_mean']:.3f} (std {report['score_std']:.3f}), "
                    f"cut by the budget {report['no_eos_share']:.0%}, by a stop string {report['stop_share']:.0%}, "
                    f"empty {report['empty_share']:.0%}, "
                    f"{report['response_length']:.1f} tokens")
        if self.kl_prompts and self.reference is not None:
            prompts = ([ex["prompt"] for ex in self.examples] if self.synthetic else self.prompts)[: self.kl_prompts]
            kl = held_out_kl(self.policy, self.reference, self.tok, prompts, gen=self.gen, chat=self.chat,
                             system=self.system, device=self.device)
            report |= kl
            line += (f"; KL to the reference {kl['kl']:.2f} nats per sampled answer ({len(prompts)} prompts, "
                     f"{kl['kl_length']:.1f} tokens)")
        self.reports[step] = report
        self.rows[step] = rows
        if self.is_main:
            self.samples.mkdir(parents=True, exist_ok=True)
            with open(self.samples / f"step_{step}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            print(f"\nheld-out {title or f'at step {step}'} ({self.size} prompts): {line}", flush=True)
            self.log.log(step, **{f"eval_{k}": v for k, v in report.items()})
        return report

    def summary(self) -> dict:
        """{"eval": every report by step; from a run that started at step 0 also "eval_before" and
        "eval_after" (the first and last reports) and, for scores, "eval_gain_sigma": (last - first
        score mean) / first score std}."""
        if not self.reports:
            return {}
        out = {"eval": {str(k): v for k, v in sorted(self.reports.items())}}
        last = max(self.reports)
        if 0 in self.reports and last > 0:
            before, after = self.reports[0], self.reports[last]
            out |= {"eval_before": before, "eval_after": after}
            if not self.synthetic and before["score_std"] > 0:
                out["eval_gain_sigma"] = (after["score_mean"] - before["score_mean"]) / before["score_std"]
        return out

    def describe(self) -> str | None:
        """One line on the whole run's held-out change, or None without a start and an end."""
        s = self.summary()
        if "eval_after" not in s:
            return None
        key = "exact_match" if self.synthetic else "score_mean"
        line = f"held-out {key.replace('_', ' ')} {s['eval_before'][key]:.3f} -> {s['eval_after'][key]:.3f}"
        if "gained" in s["eval_after"]:
            line += f" ({s['eval_after']['gained']:.0f} prompts gained, {s['eval_after']['lost']:.0f} lost)"
        return line + (f" ({s['eval_gain_sigma']:+.2f} std of the first)" if "eval_gain_sigma" in s else "")


__all__ = ["HeldOutEval", "answer_kls", "flips", "held_out_kl", "held_out_scores"]
