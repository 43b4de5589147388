"""PPO's algorithm pieces as plain functions over typed containers (the loop is recipes/ppo.py).

Shapes: B rollouts, R response tokens (right-padded, mask 1 up to and including the EOS).
Follows TRL's PPO as StackLLaMA used it: per-token reward -kl_coef * kl_t with the score added at
the last generated token, GAE with the value after the last token taken as 0, masked whitening.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import torch
import torch.nn.functional as F

from minitune.errors import MinituneError


class KLEstimator(str, Enum):
    KL = "kl"  # logp - ref_logp (k1)
    ABS = "abs"  # |logp - ref_logp|
    MSE = "mse"  # 0.5 * (logp - ref_logp)^2 (k2)
    FULL = "full"  # sum over the vocabulary of p * (log p - log q): exact per-token KL


class Trajectory(NamedTuple):
    """One rollout batch.

    query_ids: [B, P] left-padded prompts; query_mask: [B, P].
    response_ids: [B, R] generated tokens (pad after stop); response_mask: [B, R] float.
    logprobs: [B, R] policy log-probs at rollout; ref_logprobs: [B, R] reference (adapters off).
    values: [B, R] value-head estimates; scores: [B] sequence scores (after scaling/penalties).
    kl: [B, R] the per-token KL estimate used in the penalty.
    """

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor


class PPOStats(NamedTuple):
    """Per-minibatch scalars: policy/value losses, clip fractions, approx KL, ratio mean, entropy."""

    pg_loss: torch.Tensor
    vf_loss: torch.Tensor
    pg_clipfrac: torch.Tensor
    vf_clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    entropy: torch.Tensor


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise MinituneError("masked_var needs at least two unmasked values (response batch too small)")
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance); masked entries set to 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLEstimator,
                 logits: torch.Tensor | None = None, ref_logits: torch.Tensor | None = None) -> torch.Tensor:
    """[B, R] KL estimate per token. FULL needs the (temperature-scaled) logits [B, R, V]."""
    d = logp - ref_logp
    if kind == KLEstimator.KL:
        return d
    if kind == KLEstimator.ABS:
        return d.abs()
    if kind == KLEstimator.MSE:
        return 0.5 * d.square()
    if logits is None or ref_logits is None:
        raise MinituneError("the 'full' KL estimator needs the policy and reference logits")
    lp, lq = F.log_softmax(logits.float(), -1), F.log_softmax(ref_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float):
    """(rewards [B, R], non_score [B, R]): -kl_coef * kl on every response token, the score added at
    the last generated token (the EOS when one was produced, never a pad)."""
    non_score = -kl_coef * kl * mask
    rewards = non_score.clone()
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, non_score


def leave_one_out_baseline(scores: torch.Tensor, group: int) -> torch.Tensor:
    """scores [B] in contiguous groups of `group` responses to one prompt -> each score minus the mean
    of the other responses to its prompt (RLOO). A prompt whose answers all score alike then pushes
    nothing, so easy and hard prompts stop looking like good and bad actions."""
    if group < 2 or scores.numel() % group:
        raise MinituneError(f"a leave-one-out baseline needs groups of >= 2 responses; got {scores.numel()} "
                            f"scores in groups of {group}")
    g = scores.view(-1, group)
    return (g - (g.sum(1, keepdim=True) - g) / (group - 1)).flatten()


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """(advantages [B, R], returns [B, R]) with generalized advantage estimation; the value after
    the last response token is 0. Masked positions contribute nothing."""
    R = rewards.shape[1]
    rewards, values = rewards * mask, values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(R)):
        next_v = values[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        last = last * mask[:, t]  # padding after the response resets the recursion
        adv[:, t] = last
    returns = adv + values
    return adv * mask, returns * mask


def ppo_losses(logp, old_logp, values, old_values, advantages, returns, mask, *, cliprange: float,
               cliprange_value: float, entropy: torch.Tensor | None = None):
    """(pg_loss, vf_loss, PPOStats) with TRL's clipped objectives, masked means over tokens."""
    ratio = torch.exp(logp - old_logp)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    pg_loss = masked_mean(torch.max(pg1, pg2), mask)
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf1, vf2 = (values - returns) ** 2, (v_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), mask)
    stats = PPOStats(
        pg_loss.detach(), vf_loss.detach(), masked_mean((pg2 > pg1).float(), mask),
        masked_mean((vf2 > vf1).float(), mask), 0.5 * masked_mean((logp - old_logp) ** 2, mask).detach(),
        masked_mean(ratio, mask).detach(),
        masked_mean(entropy, mask).detach() if entropy is not None else torch.zeros(()),
    )
    return pg_loss, vf_loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    var_r = masked_var(returns, mask, unbiased=False)
    return float(1 - masked_var(returns - values, mask, unbiased=False) / var_r) if var_r > 0 else float("nan")


@dataclass
class AdaptiveKLController:
    """Ziegler et al.: kl_coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon."""

    value: float = 0.2
    target: float = 6.0
    horizon: float = 10000.0

    def update(self, current_kl: float, n_steps: int) -> None:
        error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, s: dict) -> None:
        self.value = float(s["value"])


@dataclass
class FixedKLController:
    value: float = 0.2

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, s: dict) -> None:
        self.value = float(s["value"])


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B, R] log-probs of `tokens` under softmax(logits / temperature): the distribution sampled
    from, so rollout and training log-probs agree (negative KL otherwise: trl #925)."""
    t = temperature if temperature > 0 else 1.0
    return F.log_softmax(logits.float() / t, -1).gather(-1, tokens[..., None])[..., 0]


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    t = temperature if temperature > 0 else 1.0
    lp = F.log_softmax(logits.float() / t, -1)
    return -(lp.exp() * lp).sum(-1)


def check_scores(scores, n: int, name: str) -> torch.Tensor:
    """Validates what a reward function returned: n finite numbers."""
    try:
        t = torch.as_tensor(scores, dtype=torch.float32).flatten()
    except (TypeError, ValueError) as e:
        raise MinituneError(f"reward function {name} returned something that is not a list of numbers: {e}") from None
    if t.numel() != n:
        raise MinituneError(f"reward function {name} returned {t.numel()} scores for {n} responses")
    if not torch.isfinite(t).all():
        raise MinituneError(f"reward function {name} returned a non-finite score: {t.tolist()}")
    return t


def response_diversity(responses: list[str]) -> float:
    """Share of distinct responses in a batch (1.0 = all different): collapse shows up here."""
    return len(set(responses)) / max(len(responses), 1)


__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KLEstimator",
    "PPOStats",
    "Trajectory",
    "check_scores",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kl_per_token",
    "leave_one_out_baseline",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "per_token_rewards",
    "ppo_losses",
    "response_diversity",
    "whiten",
]
