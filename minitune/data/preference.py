"""Preference pairs for reward modelling and DPO: parsing, tokenizing with truncation, collation, batching."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from minitune.data.packing import IGNORE
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


class PairBatch(NamedTuple):
    """input_ids: [2B, S] chosen rows first, then rejected rows, right-padded.
    attention_mask: [2B, S] (1 = real token). last_index: [2B] index of each row's last real token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last_index: torch.Tensor


def _truncated_sides(pair: PreferencePair, tok: Tokenizer, max_length: int) -> tuple[list[tuple[list[int], list[int]]], bool]:
    """[(prompt_ids, response_ids)] for chosen then rejected, each fitting max_length, and whether any
    was cut: past max_length the prompt loses its oldest tokens first, then the response its end."""
    prompt = tok.encode(pair.prompt) if pair.prompt else []
    sides, truncated = [], False
    for resp in (pair.chosen, pair.rejected):
        r = tok.encode(resp, add_special_tokens=False) + ([tok.eos_id] if tok.eos_id is not None else [])
        p = prompt
        if len(p) + len(r) > max_length:
            truncated = True
            keep_prompt = max(max_length - len(r), max_length // 2)
            p = p[-keep_prompt:] if keep_prompt > 0 else []
            r = r[: max_length - len(p)]
        sides.append((p, r))
    return sides, truncated


def tokenize_pair(pair: PreferencePair, tok: Tokenizer, max_length: int, stats: PairStats | None = None):
    """(chosen_ids, rejected_ids), each prompt + response + EOS. Past max_length the prompt loses its
    oldest tokens first, then the response its end (counted in stats.truncated)."""
    sides, truncated = _truncated_sides(pair, tok, max_length)
    if truncated and stats is not None:
        stats.truncated += 1
    return tuple(p + r for p, r in sides)


def tokenize_pair_with_prompt_length(pair: PreferencePair, tok: Tokenizer, max_length: int,
                                     stats: PairStats | None = None) -> tuple[tuple[list[int], int], tuple[list[int], int]]:
    """((chosen_ids, prompt_len), (rejected_ids, prompt_len)): as `tokenize_pair`, plus where each
    response starts. The boundary comes from tokenizing prompt and response separately."""
    sides, truncated = _truncated_sides(pair, tok, max_length)
    if truncated and stats is not None:
        stats.truncated += 1
    return tuple((p + r, len(p)) for p, r in sides)


class LabeledPairBatch(NamedTuple):
    """input_ids, attention_mask: [2B, S], chosen rows first, then rejected, right-padded.
    labels: [2B, S] next-token targets aligned with input_ids (labels[:, t] = input_ids[:, t+1]) on
    response tokens only; IGNORE on the prompt and on padding."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def collate_labeled_pairs(pairs: Sequence[tuple[tuple[list[int], int], tuple[list[int], int]]], pad_id: int) -> LabeledPairBatch:
    seqs = [c for c, _ in pairs] + [r for _, r in pairs]
    S = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), S), dtype=torch.long)
    labels = torch.full((len(seqs), S), IGNORE, dtype=torch.long)
    for i, (s, prompt_len) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        start = max(prompt_len, 1)  # the first token has no prediction before it
        labels[i, start - 1: len(s) - 1] = ids[i, start: len(s)]
    return LabeledPairBatch(ids, mask, labels)


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


def collate_pairs(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> PairBatch:
    seqs = [c for c, _ in pairs] + [r for _, r in pairs]
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), S), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return PairBatch(ids, mask, mask.sum(1) - 1)


def synthetic_preference_pairs(n_train: int, n_eval: int, tok: Tokenizer, seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """A correct answer preferred to a plausible wrong one, on the synthetic task's prompts (rendered
    with the chat template and the task's system line, as SFT trains them)."""
    from minitune.data.prompts import render_prompt
    from minitune.data.synthetic import SYSTEM, train_eval_split, wrong_answer

    rng = random.Random(seed)
    train, evals = train_eval_split(n_train, n_eval, seed=seed)

    def pairs(rows):
        return [PreferencePair(render_prompt(ex["prompt"], tok, chat=True, system=SYSTEM), ex["answer"],
                               wrong_answer(ex, rng)) for ex in rows]

    return pairs(train), pairs(evals)


def load_preference_pairs(data, tok: Tokenizer, seed: int) -> tuple[list[PreferencePair], list[PreferencePair], PairStats]:
    """(train pairs, held-out pairs, stats) for a recipe's `data` section: the synthetic task, or rows
    with chosen/rejected (and optionally prompt) columns from a file, folder or hub dataset, split
    by `data.holdout` or held out in `data.eval_source`. Rows with a missing or identical side are
    skipped and counted."""
    from minitune.data.loading import train_and_eval_rows

    stats = PairStats()
    if data.source == "synthetic":
        train, evals = synthetic_preference_pairs(data.synthetic_train, data.synthetic_eval, tok, seed)
        stats.kept = len(train) + len(evals)
        return train, evals, stats
    train_rows, eval_rows = train_and_eval_rows(data.source, [data.chosen_column, data.rejected_column],
                                                eval_source=data.eval_source, holdout=data.holdout,
                                                max_rows=data.max_rows, seed=seed)
    kw = dict(prompt_col=data.prompt_column if data.prompt_column in train_rows.column_names else None,
              chosen_col=data.chosen_column, rejected_col=data.rejected_column, hh_format=data.hh_format, stats=stats)
    return parse_pairs(train_rows, **kw), parse_pairs(eval_rows, **kw), stats
