"""Preference pairs with their prompt computed once, packed without padding.

A pair's chosen and rejected sides share the prompt (in hh-rlhf the whole dialogue but its last
answer: 100 of a pair's 188 tokens on average at 256 tokens). Laying each pair out as one sequence

    prompt | chosen | rejected        positions 0..P-1 | P..P+C-1 | P..P+R-1

with a mask under which the rejected tokens see the prompt and themselves but not the chosen ones
gives every response token exactly the context it has in its own sequence, while the prompt goes
through the model once instead of twice. Pairs are then packed first-fit-decreasing into rows as
long as the batch's longest pair, so little padding is left: on the hh-rlhf reward budget (batches
of 8 pairs at 256 tokens) 178k positions per 800 pairs against 447k for chosen and rejected rows
padded to the batch's longest (2.5x fewer).

The mask is a dense boolean [rows, 1, T, T] (`Transformer.forward` takes it as `attention_mask`).
What the losses need is returned as flat indices into the [rows * T] positions: each side's last
token (the reward head's input) and, for every response token, the position that predicts it
(DPO's log-probs; the first response token of both sides is predicted by the last prompt token).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from minitune.tokenizer import Tokenizer

PROMPT, CHOSEN, REJECTED = 0, 1, 2


class SharedPair(NamedTuple):
    """Token ids: the shared prompt, then each response (ending with EOS where the tokenizer has one)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    def __len__(self) -> int:  # tokens in the shared layout
        return len(self.prompt) + len(self.chosen) + len(self.rejected)


def tokenize_shared_pair(pair, tok: Tokenizer, max_length: int, stats=None) -> SharedPair:
    """A PreferencePair as token ids, each side (prompt + response) at most `max_length` tokens: past
    it the prompt loses its oldest tokens first (keeping at least half of max_length), then the
    responses their ends; the prompt stays the same for both sides (counted in stats.truncated)."""
    prompt = tok.encode(pair.prompt) if pair.prompt else []
    eos = [tok.eos_id] if tok.eos_id is not None else []
    chosen = tok.encode(pair.chosen, add_special_tokens=False) + eos
    rejected = tok.encode(pair.rejected, add_special_tokens=False) + eos
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest > max_length:
        keep = max(max_length - longest, max_length // 2)
        prompt = prompt[len(prompt) - keep:] if keep > 0 else []
        chosen, rejected = chosen[: max_length - len(prompt)], rejected[: max_length - len(prompt)]
        if stats is not None:
            stats.truncated += 1
    return SharedPair(prompt, chosen, rejected)


class PairLayout(NamedTuple):
    """A batch of N pairs in shared-prompt rows (see the module docstring). Flat indices address
    input_ids.flatten() (row * T + column).

    input_ids, position_ids: [rows, T]. mask: [rows, 1, T, T] bool (True = may attend).
    last: [2, N] each pair's last chosen token (row 0) and last rejected token (row 1).
    predictors: [M] the position whose output predicts each response token; targets: [M] that token;
    sides: [M] which sequence it belongs to (pair i's chosen side is i, its rejected side N + i).
    Response tokens with no position before them (a pair without a prompt: its first token) are left out.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor
    predictors: torch.Tensor
    targets: torch.Tensor
    sides: torch.Tensor

    @property
    def n_pairs(self) -> int:
        return self.last.shape[1]

    def to(self, device) -> "PairLayout":
        return PairLayout(*(t.to(device) for t in self))


def pack_rows(lengths: Sequence[int]) -> list[list[int]]:
    """First-fit decreasing: item indices grouped into rows of capacity max(lengths)."""
    cap = max(lengths)
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, u in enumerate(used):
            if u + lengths[i] <= cap:
                rows[r].append(i)
                used[r] += lengths[i]
                break
        else:
            rows.append([i])
            used.append(lengths[i])
    return rows


def layout_pairs(pairs: Sequence[SharedPair], pad_id: int) -> PairLayout:
    n = len(pairs)
    rows = pack_rows([len(p) for p in pairs])
    T = max(len(p) for p in pairs)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), T), dtype=torch.long)
    owner = torch.full((len(rows), T), -1, dtype=torch.long)  # pair index per position, -1 = padding
    branch = torch.zeros((len(rows), T), dtype=torch.long)
    last = torch.zeros((2, n), dtype=torch.long)
    predictors, targets, sides = [], [], []
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            p, c, j = pairs[i]
            P = len(p)
            start = {CHOSEN: col + P, REJECTED: col + P + len(c)}
            for b, toks, s in ((PROMPT, p, col), (CHOSEN, c, start[CHOSEN]), (REJECTED, j, start[REJECTED])):
                ids[r, s: s + len(toks)] = torch.tensor(toks, dtype=torch.long)
                pos[r, s: s + len(toks)] = torch.arange(len(toks)) + (0 if b == PROMPT else P)
                owner[r, s: s + len(toks)] = i
                branch[r, s: s + len(toks)] = b
            for b, toks, side in ((CHOSEN, c, i), (REJECTED, j, n + i)):
                s = start[b]
                last[b - 1, i] = r * T + s + len(toks) - 1
                # token k of the response is predicted at s + k - 1; the first one by the prompt's last token
                pred = [col + P - 1] + list(range(s, s + len(toks) - 1))
                keep = slice(1, None) if P == 0 else slice(None)
                predictors += [r * T + q for q in pred[keep]]
                targets += toks[keep]
                sides += [side] * len(toks[keep])
            col += P + len(c) + len(j)
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    same = (owner[:, :, None] == owner[:, None, :]) & (owner[:, :, None] >= 0)
    visible = (branch[:, None, :] == PROMPT) | (branch[:, None, :] == branch[:, :, None])
    mask = ((k <= q) & same & visible) | (k == q)
    return PairLayout(ids, pos, mask[:, None], last, torch.tensor(predictors, dtype=torch.long),
                      torch.tensor(targets, dtype=torch.long), torch.tensor(sides, dtype=torch.long))
