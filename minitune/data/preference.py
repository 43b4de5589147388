"""Preference pairs for reward modelling: parsing, tokenizing with truncation, collation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

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


def tokenize_pair(pair: PreferencePair, tok: Tokenizer, max_length: int, stats: PairStats | None = None):
    """(chosen_ids, rejected_ids), each prompt + response + EOS. Past max_length the prompt loses its
    oldest tokens first, then the response its end (counted in stats.truncated)."""
    prompt = tok.encode(pair.prompt) if pair.prompt else []
    outs, truncated = [], False
    for resp in (pair.chosen, pair.rejected):
        r = tok.encode(resp, add_special_tokens=False) + ([tok.eos_id] if tok.eos_id is not None else [])
        p = prompt
        if len(p) + len(r) > max_length:
            truncated = True
            keep_prompt = max(max_length - len(r), max_length // 2)
            p = p[-keep_prompt:] if keep_prompt > 0 else []
            r = r[: max_length - len(p)]
        outs.append(p + r)
    if truncated and stats is not None:
        stats.truncated += 1
    return outs[0], outs[1]


def collate_pairs(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> PairBatch:
    seqs = [c for c, _ in pairs] + [r for _, r in pairs]
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), S), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return PairBatch(ids, mask, mask.sum(1) - 1)
