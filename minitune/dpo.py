"""Direct preference optimization: the losses and the per-sequence log-probs they compare.

With the policy's and the reference's summed log-probs of the chosen and rejected responses,
h = (log pi(y_c) - log pi(y_r)) - (log ref(y_c) - log ref(y_r)):

- sigmoid (DPO, Rafailov et al. 2023): -log sigmoid(beta h); with label_smoothing eps the
  conservative form (cDPO) -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
- robust (Chowdhury et al. 2024): the unbiased estimate under label noise eps,
  [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps).
- ipo (Azar et al. 2023): (h - 1 / (2 beta))^2, on length-normalized log-probs (mean per response
  token, as the IPO paper and TRL use).

The implicit rewards are beta (log pi(y) - log ref(y)); preference accuracy counts pairs whose
chosen reward is the larger.
"""
from __future__ import annotations

from enum import Enum
from typing import NamedTuple

import torch
import torch.nn.functional as F

from minitune.data.shared_prompt import SharedLayout


class DPOLossType(str, Enum):
    SIGMOID = "sigmoid"
    IPO = "ipo"
    ROBUST = "robust"


class DPOOutput(NamedTuple):
    """losses: [B] per pair. chosen_rewards / rejected_rewards: [B] beta * (policy - reference)
    log-prob of each side (detached)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def response_logprobs(logits: torch.Tensor, layout: SharedLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob [2N], response token count [2N]) of each side of a shared-prompt pair layout
    (chosen sides first, then rejected; `minitune.data.shared_prompt`).

    logits: [M, V], the model's output at `layout.predictors` (`logits_at=`): row m predicts
    `layout.targets[m]`, a response token of side `layout.sides[m]`. Prompt tokens are never scored.
    """
    lp = F.log_softmax(logits.float(), -1).gather(-1, layout.targets[:, None])[:, 0]
    n = 2 * layout.n_groups
    summed = lp.new_zeros(n).index_add(0, layout.sides, lp)
    return summed, torch.bincount(layout.sides, minlength=n)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float, loss_type: DPOLossType = DPOLossType.SIGMOID,
             label_smoothing: float = 0.0) -> DPOOutput:
    """Per-pair DPO-family losses from sequence log-probs [B] (see the module docstring).

    For IPO pass length-normalized log-probs (mean per response token)."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    eps = label_smoothing
    if loss_type == DPOLossType.SIGMOID:
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == DPOLossType.ROBUST:
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return DPOOutput(losses, (beta * (policy_chosen - ref_chosen)).detach(),
                     (beta * (policy_rejected - ref_rejected)).detach())
