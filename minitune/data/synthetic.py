"""A synthetic instruction task the project generates itself: short instructions with exactly
checkable answers, a fixed seed, a train/eval split and a scorer.

Families: add two numbers, reverse a list, sort a list, convert units. Answers are a single line
(a number or a comma-separated list); a model answer is correct when its first line, with spaces
and a trailing period normalized, equals the reference.
"""
from __future__ import annotations

import random
import re
from typing import Callable

SYSTEM = "Reply with the answer only."
FAMILIES = ("add", "reverse", "sort", "convert")
_UNITS = [("kilometers", "meters", 1000), ("hours", "minutes", 60), ("kilograms", "grams", 1000),
          ("minutes", "seconds", 60), ("meters", "centimeters", 100), ("days", "hours", 24)]


def _example(rng: random.Random, family: str) -> dict:
    if family == "add":
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        return {"prompt": f"What is {a} + {b}?", "answer": str(a + b)}
    if family in ("reverse", "sort"):
        xs = rng.sample(range(1, 100), rng.randint(4, 6))
        listed = ", ".join(map(str, xs))
        if family == "reverse":
            return {"prompt": f"Reverse the order of this list: {listed}", "answer": ", ".join(map(str, xs[::-1]))}
        return {"prompt": f"Sort these numbers from smallest to largest: {listed}", "answer": ", ".join(map(str, sorted(xs)))}
    src, dst, k = rng.choice(_UNITS)
    n = rng.randint(2, 99)
    return {"prompt": f"Convert {n} {src} to {dst}.", "answer": str(n * k)}


def make_task(n: int, seed: int = 0, families=FAMILIES) -> list[dict]:
    """n examples {prompt, answer, family, messages} cycling through the families."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        fam = families[i % len(families)]
        ex = _example(rng, fam)
        ex["family"] = fam
        ex["messages"] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ex["prompt"]},
                          {"role": "assistant", "content": ex["answer"]}]
        out.append(ex)
    return out


def train_eval_split(n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint splits (eval prompts never appear in train)."""
    train = make_task(n_train, seed=seed)
    seen = {ex["prompt"] for ex in train}
    pool = make_task(n_eval * 3, seed=seed + 10_000)
    evals = [ex for ex in pool if ex["prompt"] not in seen][:n_eval]
    return train, evals


def wrong_answer(ex: dict, rng: random.Random) -> str:
    """A wrong answer of the kind small models actually give: echoing the input instead of working
    on it (for preference pairs). Reverse/sort: the input list unchanged; convert: the number left
    unconverted; add: one operand repeated. Subtler errors (one wrong digit in a sum) are not
    learnable by a small reward model in minutes: see `near_miss_answer`."""
    fam, ans = ex["family"], ex["answer"]
    if fam in ("reverse", "sort"):
        given = ex["prompt"].split(": ", 1)[1]
        if normalize(given) != normalize(ans):
            return given
        xs = ans.split(", ")
        return ", ".join(xs[1:] + xs[:1])
    if fam == "add":
        a, b = re.findall(r"\d+", ex["prompt"])
        return rng.choice([a, b])
    return ex["prompt"].split()[1]  # "Convert 7 km to m." -> "7"


def near_miss_answer(ex: dict, rng: random.Random) -> str:
    """A wrong answer of the right form, the kind a model that has learnt the format still gives:
    add: one digit off by one (a carry slip); reverse/sort: two neighbours swapped; convert: the
    factor of another unit pair (x60 for x24) or a power of ten off."""
    fam, ans = ex["family"], ex["answer"]
    if fam in ("reverse", "sort"):
        xs = ans.split(", ")
        i = rng.randrange(len(xs) - 1)
        xs[i], xs[i + 1] = xs[i + 1], xs[i]
        return ", ".join(xs)
    value = int(ans)
    if fam == "add":
        return str(value + rng.choice([-1, 1]) * 10 ** rng.randrange(len(ans) - 1))
    n = int(re.findall(r"\d+", ex["prompt"])[0])
    k = value // n
    factors = sorted(({f for _, _, f in _UNITS} | {k * 10, max(k // 10, 1)}) - {k})
    return str(n * rng.choice(factors))


def normalize(text: str) -> str:
    first = text.strip().split("\n")[0].strip()
    first = re.sub(r"\s+", " ", first).rstrip(".").strip()
    return re.sub(r"\s*,\s*", ", ", first)


def is_correct(answer: str, reference: str) -> bool:
    return normalize(answer) == normalize(reference)


def correctness_reward(responses: list[str], references: list[str]) -> list[float]:
    """PPO reward: 1.0 for an exactly correct answer, else 0.0. Config: `minitune.data.synthetic:correctness_reward`."""
    return [1.0 if is_correct(r, ref) else 0.0 for r, ref in zip(responses, references)]


def _items(text: str) -> list[str]:
    return [x for x in normalize(text).split(", ") if x]


def order_credit(answer: str, reference: str) -> float:
    """How much of a list answer is right, in [0, 1]: the share of the reference's pairs of items
    that the answer holds in the same order (first occurrences; a missing item breaks its pairs),
    times len ratio of the shorter to the longer list (extra or dropped items cost). A sort answer
    that puts one item in the wrong place loses only that item's pairs, and moving it toward its
    place earns credit step by step."""
    ref, ans = _items(reference), _items(answer)
    if len(ref) < 2 or not ans:
        return float(ref == ans)
    pos = {}
    for i, x in enumerate(ans):
        pos.setdefault(x, i)
    pairs = [(a, b) for i, a in enumerate(ref) for b in ref[i + 1:]]
    kept = sum(a in pos and b in pos and pos[a] < pos[b] for a, b in pairs)
    return kept / len(pairs) * min(len(ans), len(ref)) / max(len(ans), len(ref))


def partial_credit_reward(responses: list[str], references: list[str]) -> list[float]:
    """1.0 for an exactly correct answer; a wrong list answer (reverse, sort) earns half its
    `order_credit`, a wrong number 0. Exact-match alone gives no signal where every sampled answer
    is wrong, which is how the SFT adapter fails at sorting (one-digit numbers placed like text:
    "37, 38, 54, 9"); ordering credit rewards the samples that move such a number toward its place.
    Config: `reward.function: minitune.data.synthetic:partial_credit_reward`."""
    return _half_credit(responses, references, number_credit=lambda answer, reference: 0.0)


def _half_credit(responses: list[str], references: list[str], number_credit) -> list[float]:
    """1.0 for an exactly correct answer; else half the credit of a wrong list answer (`order_credit`) or
    of a wrong number answer (`number_credit(answer, reference)`)."""
    return [1.0 if is_correct(r, ref) else 0.5 * (order_credit(r, ref) if "," in ref else number_credit(r, ref))
            for r, ref in zip(responses, references)]


def digit_credit(answer: str, reference: str) -> float:
    """How much of a number answer is right, in [0, 1]: the share of digit places, aligned from the units,
    where it has the reference's digit, over the longer of the two (a missing or extra digit costs). A sum
    with one carry wrong ("1451" for "1461") earns 3/4; anything that is not a whole number, 0."""
    ans, ref = normalize(answer), normalize(reference)
    if not (ans.isdigit() and ref.isdigit()):
        return float(ans == ref)
    return sum(a == b for a, b in zip(reversed(ans), reversed(ref))) / max(len(ans), len(ref))


def graded_reward(responses: list[str], references: list[str]) -> list[float]:
    """1.0 for an exactly correct answer; a wrong list answer earns half its `order_credit`, a wrong number
    half its `digit_credit` (partial_credit_reward gives numbers 0): the add and convert prompts whose
    samples are all wrong then still rank them, by the digits they get right.
    Config: `reward.function: minitune.data.synthetic:graded_reward`."""
    return _half_credit(responses, references, number_credit=digit_credit)


def accuracy(answers: list[str], examples: list[dict]) -> float:
    return sum(is_correct(a, ex["answer"]) for a, ex in zip(answers, examples)) / max(len(examples), 1)


Scorer = Callable[[list[str], list[str]], list[float]]
