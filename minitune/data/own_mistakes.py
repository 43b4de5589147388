"""Preference pairs on the synthetic task whose rejected side is the model's own mistake: the
reference answer preferred to a wrong answer the start adapter actually samples. Made-up wrong
answers (`wrong_answer`, `near_miss_answer`) are easy to tell apart and are not what the model
gets wrong; its own sampled mistakes are (on-policy negatives, as in iterative / online DPO).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from minitune.data.preference import PreferencePair
from minitune.data.prompts import render_prompt
from minitune.data.synthetic import SYSTEM, is_correct
from minitune.rollout import sample_rollout
from minitune.tokenizer import Tokenizer
from minitune.train.sections import GenSection


@dataclass
class MistakeStats:
    prompts: int = 0  # prompts sampled
    pairs: int = 0  # prompts with at least one wrong answer: one pair each
    all_right: int = 0  # prompts whose every sample was right: no pair

    def summary(self) -> str:
        return (f"own-mistake pairs: {self.pairs} from {self.prompts} prompts sampled "
                f"({self.all_right} answered right every time: no pair)")


def own_mistake_pairs(model, tok: Tokenizer, examples: list[dict], *, wanted: int, samples: int = 4,
                      temperature: float = 0.7, prompts_per_call: int = 32, seed: int = 0,
                      device=None) -> tuple[list[PreferencePair], MistakeStats]:
    """Up to `wanted` pairs (reference answer, a wrong sampled answer), sampling `samples` answers at
    `temperature` to consecutive `examples` (32 new tokens, every synthetic answer fits) until
    `wanted` pairs exist or the examples run out. The rejected side is the most frequent wrong answer
    of the prompt (ties: the first sampled), the mistake the model is likeliest to make. Sample
    with the start adapter active: the pairs must not depend on where training resumed."""
    if wanted < 1 or samples < 1:
        raise ValueError(f"wanted ({wanted}) and samples ({samples}) must be >= 1")
    gen = GenSection.synthetic(temperature)
    rng = random.Random(seed)
    pairs, stats = [], MistakeStats()
    for s in range(0, len(examples), prompts_per_call):
        chunk = examples[s: s + prompts_per_call]
        ro = sample_rollout(model, tok, [ex["prompt"] for ex in chunk], [ex["answer"] for ex in chunk], gen=gen,
                            k=samples, rng=rng, chat=True, system=SYSTEM, device=device)
        for i, ex in enumerate(chunk):
            stats.prompts += 1
            wrong = [a.strip() for a in ro.responses[i * samples: (i + 1) * samples] if not is_correct(a, ex["answer"])]
            wrong = [a for a in wrong if a]
            if not wrong:
                stats.all_right += 1
                continue
            rejected = max(wrong, key=lambda a: (wrong.count(a), -wrong.index(a)))
            pairs.append(PreferencePair(render_prompt(ex["prompt"], tok, chat=True, system=SYSTEM), ex["answer"],
                                        rejected))
            stats.pairs += 1
            if len(pairs) == wanted:
                return pairs, stats
    return pairs, stats


__all__ = ["MistakeStats", "own_mistake_pairs"]
