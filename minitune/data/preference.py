"""Preference pairs for reward modelling and DPO: parsing and batching (tokenizing and layout:
`minitune.data.shared_prompt`)."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import NamedTuple

from minitune.errors import MinituneError
from minitune.tokenizer import Tokenizer

HH_ASSISTANT = "\n\nAssistant:"


class PreferencePair(NamedTuple):
    prompt: str
    chosen: str
    rejected: str


def split_hh(chosen: str, rejected: str) -> PreferencePair:
    """hh-rlhf rows hold whole dialogues; the prompt is everything up to and including the last
    "\\n\\nAssistant:" they share, the responses are what follows."""
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        return PreferencePair("", chosen, rejected)
    prefix = chosen[: cut + len(HH_ASSISTANT)]
    if not rejected.startswith(prefix):
        # The dialogues diverge earlier: keep the longest common prefix ending at an Assistant turn.
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        cut = chosen.rfind(HH_ASSISTANT, 0, n)
        prefix = chosen[: cut + len(HH_ASSISTANT)] if cut >= 0 else ""
    return PreferencePair(prefix, chosen[len(prefix):], rejected[len(prefix):])


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_messages(dialogue: str) -> list[dict]:
    """"\n\nHuman: ...\n\nAssistant: ..." text -> chat messages (user/assistant turns, stripped);
    a trailing empty "Assistant:" turn (an hh prompt) is dropped."""
    parts = _HH_TURN.split(dialogue)
    msgs = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
            for who, text in zip(parts[1::2], parts[2::2])]
    return msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"] else msgs


def hh_chat_pair(pair: PreferencePair, tok: Tokenizer) -> PreferencePair:
    """An hh pair (from `split_hh`) rendered with the tokenizer's chat template: the dialogue so far
    as user/assistant turns ending in the generation prompt, each response as the assistant's text
    (the template's end of turn is the EOS the tokenizer appends)."""
    prompt = tok.apply_chat_template(hh_messages(pair.prompt), add_generation_prompt=True) if pair.prompt else ""
    return PreferencePair(prompt, pair.chosen.strip(), pair.rejected.strip())


@dataclass
class PairStats:
    kept: int = 0
    missing_side: int = 0
    identical: int = 0
    truncated: int = 0

    def summary(self) -> str:
        return (f"pairs: kept {self.kept}; skipped {self.missing_side} with a missing side, "
                f"{self.identical} with chosen == rejected; truncated {self.truncated} longer than max_length")


def parse_pairs(rows, *, prompt_col: str | None = "prompt", chosen_col: str = "chosen", rejected_col: str = "rejected",
                hh_format: bool = False, stats: PairStats | None = None) -> list[PreferencePair]:
    """Rows -> PreferencePair list, skipping (and counting) rows with a missing side or identical sides."""
    stats = stats if stats is not None else PairStats()
    out = []
    for row in rows:
        for col in (chosen_col, rejected_col):
            if col not in row:
                raise MinituneError(f"column {col!r} not found; the rows have columns {sorted(row)}")
        c, r = row.get(chosen_col), row.get(rejected_col)
        if not isinstance(c, str) or not isinstance(r, str) or not c.strip() or not r.strip():
            stats.missing_side += 1
            continue
        if hh_format:
            pair = split_hh(c, r)
        else:
            pair = PreferencePair(row.get(prompt_col, "") if prompt_col else "", c, r)
        if pair.chosen.strip() == pair.rejected.strip():
            stats.identical += 1
            continue
        out.append(pair)
    stats.kept += len(out)
    return out


def pair_batches(pairs, batch_size: int, seed: int, start_index: int = 0):
    """Endless shuffled batches of `pairs`: yields (batch index, batch); `start_index` skips the
    batches already consumed, so a resumed run sees exactly what the uninterrupted one would."""
    epoch, i = 0, 0
    order = list(range(len(pairs)))
    while True:
        random.Random(seed + epoch).shuffle(order)
        for s in range(0, len(order) - batch_size + 1, batch_size):
            if i >= start_index:
                yield i, [pairs[j] for j in order[s: s + batch_size]]
            i += 1
        epoch += 1


def synthetic_preference_pairs(n_train: int, n_eval: int, tok: Tokenizer, seed: int,
                               rejected: str = "echo") -> tuple[list[PreferencePair], list[PreferencePair]]:
    """A correct answer preferred to a wrong one, on the synthetic task's prompts (rendered with the
    chat template and the task's system line, as SFT trains them). rejected: "echo" (the input given
    back: `wrong_answer`) or "near_miss" (the right form with one slip: `near_miss_answer`); "own"
    gives near-miss pairs here, whose training side the DPO recipe replaces with the start adapter's
    own mistakes (`minitune.data.own_mistakes`) once the model is built."""
    from minitune.data.prompts import render_prompt
    from minitune.data.synthetic import SYSTEM, near_miss_answer, train_eval_split, wrong_answer

    kinds = {"echo": wrong_answer, "near_miss": near_miss_answer, "own": near_miss_answer}  # own: see own_mistakes.py
    kind = getattr(rejected, "value", rejected)
    if kind not in kinds:
        raise MinituneError(f"data.synthetic_rejected={kind!r} is not one of {sorted(kinds)}")
    wrong = kinds[kind]

    rng = random.Random(seed)
    train, evals = train_eval_split(n_train, n_eval, seed=seed)

    def pairs(rows):
        return [PreferencePair(render_prompt(ex["prompt"], tok, chat=True, system=SYSTEM), ex["answer"],
                               wrong(ex, rng)) for ex in rows]

    return pairs(train), pairs(evals)


def load_preference_pairs(data, tok: Tokenizer, seed: int) -> tuple[list[PreferencePair], list[PreferencePair], PairStats]:
    """(train pairs, held-out pairs, stats) for a recipe's `data` section: the synthetic task, or rows
    with chosen/rejected (and optionally prompt) columns from a file, folder or hub dataset, split
    by `data.holdout` or held out in `data.eval_source`. Rows with a missing or identical side are
    skipped and counted."""
    from minitune.data.loading import train_and_eval_rows

    stats = PairStats()
    if data.source == "synthetic":
        train, evals = synthetic_preference_pairs(data.synthetic_train, data.synthetic_eval, tok, seed,
                                                   data.synthetic_rejected)
        stats.kept = len(train) + len(evals)
        return train, evals, stats
    train_rows, eval_rows = train_and_eval_rows(data.source, [data.chosen_column, data.rejected_column],
                                                eval_source=data.eval_source, holdout=data.holdout,
                                                max_rows=data.max_rows, seed=seed)
    kw = dict(prompt_col=data.prompt_column if data.prompt_column in train_rows.column_names else None,
              chosen_col=data.chosen_column, rejected_col=data.rejected_column, hh_format=data.hh_format, stats=stats)
    train, evals = parse_pairs(train_rows, **kw), parse_pairs(eval_rows, **kw)
    if data.hh_format and data.hh_chat:
        train, evals = [hh_chat_pair(p, tok) for p in train], [hh_chat_pair(p, tok) for p in evals]
    return train, evals, stats
