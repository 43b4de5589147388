"""Responses that share a prompt, laid out with the prompt computed once and packed without padding.

Preference pairs (a chosen and a rejected answer) and RL groups (G sampled answers to one prompt)
repeat their prompt in every sequence: in hh-rlhf the whole dialogue but its last answer is 100 of
a pair's 188 tokens on average at 256 tokens; in the synthetic task's GRPO groups the chat-rendered
prompt is ~45 of a row's ~57 tokens. Laying each group out as one sequence

    prompt | response 0 | response 1 | ...      positions 0..P-1 | P..P+L0-1 | P..P+L1-1 | ...

with a mask under which each response's tokens see the prompt and themselves but no other response
gives every response token exactly the context it has in its own sequence, while the prompt goes
through the model once instead of G times. Groups are then packed first-fit-decreasing into rows as
long as the batch's longest group, so little padding is left: on the hh-rlhf reward budget (batches
of 8 pairs at 256 tokens) 178k positions per 800 pairs against 447k for chosen and rejected rows
padded to the batch's longest (2.5x fewer).

The mask is a dense boolean [rows, 1, T, T] (`Transformer.forward` takes it as `attention_mask`).
What the losses need is returned as flat indices into the [rows * T] positions: each response's last
token (the reward head's input) and, for every response token, the position that predicts it
(log-probs; the first token of every response is predicted by the last prompt token).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from minitune.tokenizer import Tokenizer

PROMPT = 0  # branch id of prompt tokens; response j of a group has branch j + 1


class SharedPair(NamedTuple):
    """Token ids: the shared prompt, then each response (ending with EOS where the tokenizer has one)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    def __len__(self) -> int:  # tokens in the shared layout
        return len(self.prompt) + len(self.chosen) + len(self.rejected)


class SharedGroup(NamedTuple):
    """Token ids of one prompt and the responses that follow it (any number, each possibly empty)."""

    prompt: list[int]
    responses: tuple[list[int], ...]

    def __len__(self) -> int:
        return len(self.prompt) + sum(len(r) for r in self.responses)


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


class SharedLayout(NamedTuple):
    """A batch of N groups of k responses each in shared-prompt rows (see the module docstring).
    Response j of group i is response number j * N + i (for pairs: chosen sides first, then
    rejected). Flat indices address input_ids.flatten() (row * T + column).

    input_ids, position_ids: [rows, T]. mask: [rows, 1, T, T] bool (True = may attend).
    last: [k, N] the last token of each response (of the prompt where the response is empty).
    predictors: [M] the position whose output predicts each response token; targets: [M] that token;
    sides: [M] the response number it belongs to; steps: [M] its index within that response.
    Response tokens with no position before them (a group without a prompt: each response's first
    token) are left out.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor
    predictors: torch.Tensor
    targets: torch.Tensor
    sides: torch.Tensor
    steps: torch.Tensor

    @property
    def n_groups(self) -> int:
        return self.last.shape[1]

    @property
    def group_size(self) -> int:
        return self.last.shape[0]

    def rows(self) -> torch.Tensor:
        """[M] for each response token, its row in a batch whose rows i*k .. i*k+k-1 are group i's
        responses (response j * N + i is row i * k + j)."""
        n = self.n_groups
        return (self.sides % n) * self.group_size + self.sides // n

    def to(self, device) -> "SharedLayout":
        return SharedLayout(*(t.to(device) for t in self))


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


def groups_from_rows(sequences: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                     k: int) -> list[SharedGroup]:
    """Padded rows [B, P+R] (left-padded prompts, then responses under response_mask [B, R]) whose
    rows i*k .. i*k+k-1 answer one prompt, as B/k groups: the prompt without its padding (from the
    group's first row), each response's tokens under its mask."""
    B, R = response_mask.shape
    if B % k:
        raise ValueError(f"{B} rows do not split into groups of {k}")
    P = sequences.shape[1] - R
    lengths = response_mask.sum(1).tolist()
    out = []
    for g in range(B // k):
        row = g * k
        prompt = sequences[row, :P][attention_mask[row, :P].bool()].tolist()
        out.append(SharedGroup(prompt, tuple(sequences[row + j, P: P + int(lengths[row + j])].tolist() for j in range(k))))
    return out


def layout_pairs(pairs: Sequence[SharedPair], pad_id: int) -> SharedLayout:
    """Preference pairs as groups of two: chosen sides are responses 0..N-1, rejected N..2N-1."""
    return layout_groups([SharedGroup(p.prompt, (p.chosen, p.rejected)) for p in pairs], pad_id)


def layout_groups(groups: Sequence[SharedGroup], pad_id: int) -> SharedLayout:
    n = len(groups)
    k = len(groups[0].responses) if groups else 0
    if any(len(g.responses) != k for g in groups):
        raise ValueError(f"every group needs the same number of responses ({k}); got "
                         f"{sorted({len(g.responses) for g in groups})}")
    rows = pack_rows([len(g) for g in groups])
    T = max(len(g) for g in groups)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), T), dtype=torch.long)
    owner = torch.full((len(rows), T), -1, dtype=torch.long)  # group index per position, -1 = padding
    branch = torch.zeros((len(rows), T), dtype=torch.long)
    last = torch.zeros((k, n), dtype=torch.long)
    predictors, targets, sides, steps = [], [], [], []
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            prompt, responses = groups[i]
            P = len(prompt)
            s = col
            for b, toks in enumerate((prompt, *responses)):
                ids[r, s: s + len(toks)] = torch.tensor(toks, dtype=torch.long)
                pos[r, s: s + len(toks)] = torch.arange(len(toks)) + (0 if b == PROMPT else P)
                owner[r, s: s + len(toks)] = i
                branch[r, s: s + len(toks)] = b
                if b != PROMPT:
                    last[b - 1, i] = r * T + (s + len(toks) - 1 if toks else col + P - 1)
                    # token t of the response is predicted at s + t - 1; the first one by the prompt's last token
                    pred = [col + P - 1] + list(range(s, s + len(toks) - 1))
                    first = 1 if P == 0 else 0
                    predictors += [r * T + q for q in pred[first: len(toks)]]
                    targets += toks[first:]
                    sides += [(b - 1) * n + i] * (len(toks) - first)
                    steps += list(range(first, len(toks)))
                s += len(toks)
            col = s
    q, kk = torch.arange(T)[:, None], torch.arange(T)[None, :]
    same = (owner[:, :, None] == owner[:, None, :]) & (owner[:, :, None] >= 0)
    visible = (branch[:, None, :] == PROMPT) | (branch[:, None, :] == branch[:, :, None])
    mask = ((kk <= q) & same & visible) | (kk == q)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return SharedLayout(ids, pos, mask[:, None], last, as_long(predictors), as_long(targets), as_long(sides),
                        as_long(steps))
