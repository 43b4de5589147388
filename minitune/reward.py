"""Reward modelling pieces: a scalar head on the final hidden state at each sequence's last real
token, the pairwise loss, and loading a saved reward model as a named adapter on a shared base."""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from minitune.adapters import load_adapter, read_adapter_metadata
from minitune.data.shared_prompt import SharedLayout
from minitune.errors import MinituneError
from minitune.generate import positions_from_mask

HEAD_KEY = "score.weight"  # PEFT keeps a sequence-classification head as module "score" (modules_to_save)


class RewardHead(nn.Module):
    """Linear(hidden, 1) with no bias, named like transformers' sequence-classification head."""

    def __init__(self, hidden: int, device=None, dtype=torch.float32):
        super().__init__()
        self.score = nn.Linear(hidden, 1, bias=False, device=device, dtype=dtype)
        nn.init.normal_(self.score.weight, std=1.0 / (hidden + 1) ** 0.5)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.score(pooled.to(self.score.weight.dtype)).squeeze(-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {HEAD_KEY: self.score.weight}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        w = tensors.get(HEAD_KEY)
        if w is None:
            raise MinituneError(f"the reward adapter has no {HEAD_KEY} (saved by the reward recipe?)")
        if tuple(w.shape) != tuple(self.score.weight.shape):
            raise MinituneError(
                f"reward head {HEAD_KEY} has shape {tuple(w.shape)} but this base needs {tuple(self.score.weight.shape)} "
                "(a head trained on a model of another width)"
            )
        with torch.no_grad():
            self.score.weight.copy_(w)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[N] index of each row's last real token, from the mask alone (works for left and right
    padding, and when pad == eos, where searching for the pad id would move the position)."""
    S = attention_mask.shape[1]
    idx = torch.arange(S, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, torch.full_like(idx, -1)).max(dim=1).values


def last_token_states(attention_mask: torch.Tensor):
    """hidden [N, S, H] -> [N, H], each row's state at its last real token (the reward head's input)."""
    rows, last = torch.arange(attention_mask.shape[0], device=attention_mask.device), last_token_index(attention_mask)
    return lambda hidden: hidden[rows, last]


def sequence_rewards(model, head: RewardHead | None, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[N] scalar rewards of padded sequences [N, S]. `head=None`: `model` is a `WithHead` holding
    the head (the reward recipe trains it so, under DDP/FSDP); else the head is applied outside (a
    frozen reward model sharing a policy's base)."""
    pos, pick = positions_from_mask(attention_mask), last_token_states(attention_mask)
    if head is None:
        return model(input_ids, pos, attention_mask, return_logits=False, head_on=pick)[1]
    return head(pick(model(input_ids, pos, attention_mask, return_logits=False).hidden))


def pair_rewards(model, head: RewardHead | None, layout: SharedLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rewards [N] of pairs laid out with their prompt shared (one forward for
    both sides; `minitune.data.shared_prompt`). `head` as in `sequence_rewards`."""
    at = layout.last.flatten()
    pick = lambda hidden: hidden.flatten(0, 1)[at]  # noqa: E731
    args = (layout.input_ids, layout.position_ids, layout.mask)
    r = model(*args, return_logits=False, head_on=pick)[1] if head is None else head(pick(model(*args, return_logits=False).hidden))
    return r[: layout.n_groups], r[layout.n_groups:]


class PairMetrics(NamedTuple):
    loss: torch.Tensor  # scalar, mean over pairs
    accuracy: torch.Tensor  # share of pairs with r_chosen > r_rejected
    margin: torch.Tensor  # mean r_chosen - r_rejected


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, *, margin: torch.Tensor | float = 0.0,
                  center_coef: float = 0.0, reduction: str = "mean") -> PairMetrics:
    """-logsigmoid(r_c - r_r - margin), plus center_coef * (r_c + r_r)^2 to keep rewards centred at 0."""
    diff = r_chosen - r_rejected
    per_pair = -F.logsigmoid(diff - margin) + center_coef * (r_chosen + r_rejected) ** 2
    loss = per_pair.mean() if reduction == "mean" else per_pair.sum()
    return PairMetrics(loss, (diff > 0).float().mean(), diff.mean())


def load_reward_adapter(model: nn.Module, folder: str | os.PathLike, name: str = "reward") -> RewardHead:
    """Loads a reward model saved by recipes/reward_model.py as adapter `name` (frozen) onto `model`
    and returns its head. The base stays shared with whatever adapters the model already has."""
    _, extra = load_adapter(model, folder, name, trainable=False)
    hidden = model.config.hidden_size
    ref = next(p for p in model.parameters() if p.device.type != "meta")
    head = RewardHead(hidden, device=ref.device)
    head.load(extra)
    head.requires_grad_(False)
    return head


def check_rendering(folder: str | os.PathLike, rendering: str) -> None:
    """Refuses a reward adapter trained on prompts rendered otherwise than the prompts it is about to
    score (`minitune.data.prompts.prompt_rendering`): its scores would not mean what they meant in
    training. An adapter that does not record its rendering (older, or made elsewhere) gets a note."""
    trained = read_adapter_metadata(folder).get("rendering")
    if trained is None:
        print(f"note: reward adapter {folder} does not record how its prompts were rendered; "
              f"these prompts are rendered as {rendering!r}")
        return
    if trained != rendering:
        fix = {"hh-raw": "data.hh_chat=false", "hh-chat": "data.hh_chat=true"}.get(trained, f"the {trained!r} rendering")
        raise MinituneError(f"reward.adapter {folder} was trained on prompts rendered as {trained!r}, but data renders "
                            f"them as {rendering!r}; use {fix}, or train the reward model on this rendering")
