"""PPO's algorithm pieces: the value head, running score moments, and plain functions over typed
containers (the loop is recipes/ppo.py).

Shapes: B rollouts, R response tokens (right-padded, mask 1 up to and including the EOS).
Follows TRL's PPO as StackLLaMA used it: per-token reward -kl_coef * kl_t with the score added at
the last generated token, GAE with the value after the last token taken as 0, masked whitening.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from minitune.distributed import all_reduce_max
from minitune.errors import MinituneError
from minitune.data.shared_prompt import groups_from_rows, layout_groups


class KLEstimator(str, Enum):
    KL = "kl"  # logp - ref_logp (k1)
    ABS = "abs"  # |logp - ref_logp|
    MSE = "mse"  # 0.5 * (logp - ref_logp)^2 (k2)
    FULL = "full"  # sum over the vocabulary of p * (log p - log q): exact per-token KL


class Trajectory(NamedTuple):
    """One rollout batch, everything the PPO update reads.

    sequences: [B, P+R] left-padded prompts then the responses; attention_mask: [B, P+R].
    response_mask: [B, R] float, 1 up to and including each response's EOS.
    logprobs / ref_logprobs: [B, R] policy (at rollout) and reference log-probs of the response.
    values: [B, R] value estimates (zeros without a value function); kl: [B, R] the per-token KL
    estimate in the penalty; scores: [B] sequence scores after baselines and penalties;
    advantages / returns: [B, R].
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    kl: torch.Tensor
    scores: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    @property
    def prompt_length(self) -> int:
        return self.sequences.shape[1] - self.response_mask.shape[1]

    def select(self, index: torch.Tensor) -> "Trajectory":
        """The rows `index` of every field: a minibatch."""
        return Trajectory(*(t[index] for t in self))


class PPOStats(NamedTuple):
    """Per-minibatch scalars: policy/value losses, clip fractions, approx KL, ratio mean, entropy."""

    pg_loss: torch.Tensor
    vf_loss: torch.Tensor
    pg_clipfrac: torch.Tensor
    vf_clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    entropy: torch.Tensor


@dataclass
class PPOSettings:
    """PPO's hyperparameters (the `ppo:` section of recipes/ppo.py's config). Defaults are TRL's
    legacy PPO as StackLLaMA used it."""

    rollout_batch: int = 16  # prompts per rollout per rank
    mini_batch: int = 4
    ppo_epochs: int = 4
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    ratio_threshold: float = 10.0  # skip a minibatch whose mean ratio exceeds this
    kl_estimator: KLEstimator = KLEstimator.KL
    adaptive_kl: bool = True
    init_kl_coef: float = 0.2
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    kl_coef_min: float = 0.0  # the adaptive weight never drops below this: while KL sits under target the
    # controller keeps lowering the weight, and by the time KL takes off there is nothing left to hold it
    whiten_advantages: bool = True
    score_scale: float = 1.0
    score_norm: bool = False  # divide scores by their running std
    score_baseline: bool = False  # subtract the running mean score
    samples_per_prompt: int = 1  # responses sampled per prompt; rollout_batch counts responses
    group_baseline: bool = False  # subtract the mean score of the prompt's other responses (RLOO); needs >= 2
    score_clip: float = 0.0  # 0: no clipping
    value_dropout: float = 0.1
    value_detach: bool = False  # train the value head on detached hidden states: the policy's LoRA weights then
    # get only the policy gradient (the shared-trunk value loss can pull a small model's answers around)
    use_value: bool = True  # false: no value function; each token's advantage is its return (score + KL penalties
    # to the end, discounted by gamma; lam unused): REINFORCE, or RLOO with group_baseline
    skip_equal_groups: bool = False  # with group_baseline and no value function: drop the prompts whose answers all
    # scored alike before the log-prob forwards and the update (their baselined scores are 0; only the KL penalty
    # would train them), as GRPO does. Under torchrun every rank keeps as many prompts as the rank with the most
    # signal (topped up with its own skipped ones), so all run the same forwards and optimizer steps


class ValueHead(nn.Module):
    """dropout + Linear(hidden, 1) per token on the policy's last hidden state (TRL's value head)."""

    def __init__(self, hidden: int, dropout: float, device=None):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.summary = nn.Linear(hidden, 1, device=device)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.summary(self.dropout(h.float())).squeeze(-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"v_head.summary.weight": self.summary.weight, "v_head.summary.bias": self.summary.bias}

    def load(self, t: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.summary.weight.copy_(t["v_head.summary.weight"])
            self.summary.bias.copy_(t["v_head.summary.bias"])


@dataclass
class RunningMoments:
    """Running mean/std of scores (for baseline subtraction and normalization)."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 1e-8

    def update(self, x: torch.Tensor) -> None:
        n, m, v = x.numel(), x.mean().item(), x.var(unbiased=False).item() if x.numel() > 1 else 0.0
        total = self.count + n
        delta = m - self.mean
        self.mean += delta * n / total
        self.var = (self.var * self.count + v * n + delta ** 2 * self.count * n / total) / total
        self.count = total


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
                 logits: torch.Tensor | None = None, ref_logits: torch.Tensor | None = None,
                 temperature: float = 1.0) -> torch.Tensor:
    """[B, R] KL estimate per token. FULL needs the raw logits [B, R, V]: both distributions are taken
    at `temperature`, as logprobs_from_logits takes the log-probs."""
    d = logp - ref_logp
    if kind == KLEstimator.KL:
        return d
    if kind == KLEstimator.ABS:
        return d.abs()
    if kind == KLEstimator.MSE:
        return 0.5 * d.square()
    if logits is None or ref_logits is None:
        raise MinituneError("the 'full' KL estimator needs the policy and reference logits")
    t = sampling_temperature(temperature)
    lp, lq = F.log_softmax(logits.float() / t, -1), F.log_softmax(ref_logits.float() / t, -1)
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


def policy_forward(model, seq, mask, response_mask, group: int, temperature: float, *, values=True, with_entropy=False,
                   with_logits=False, detach_values=False):
    """(log-probs [B, R], values [B, R] or None, entropy [B, R] or None, logits [B, R, V] or None) of
    the response part of padded rows `seq` [B, P+R] (attention `mask` [B, P+R], `response_mask`
    [B, R]); 0 past each response. Rows i*group .. i*group+group-1 share a prompt, which goes
    through the model once for them (`minitune.data.shared_prompt`: each response sees the prompt
    and itself, packed without padding), and the output projection runs only where a response token
    is predicted. With `values`, `model` is a `WithHead(policy, value_head)` (possibly inside
    DDP/FSDP, so the head is synchronized with the adapter) and the value of a token is the head on
    the position that predicts it."""
    layout = layout_groups(groups_from_rows(seq, mask, response_mask, group), pad_id=0).to(seq.device)
    at = layout.predictors
    args = (layout.input_ids, layout.position_ids, layout.mask)
    if values:
        pick = (lambda h: h.flatten(0, 1)[at].detach()) if detach_values else (lambda h: h.flatten(0, 1)[at])
        out, v = model(*args, logits_at=at, head_on=pick)
    else:
        out, v = model(*args, logits_at=at), None
    where = (layout.rows(), layout.steps)
    B, R = response_mask.shape
    place = lambda x: x.new_zeros((B, R, *x.shape[1:])).index_put(where, x)  # noqa: E731  [M, ...] -> [B, R, ...]
    logp = place(logprobs_from_logits(out.logits, layout.targets, temperature))
    ent = place(entropy_from_logits(out.logits, temperature)) if with_entropy else None
    return logp, place(v) if values else None, ent, place(out.logits) if with_logits else None


def trajectory(policy, reference, sequences: torch.Tensor, attention_mask: torch.Tensor,
               response_mask: torch.Tensor, scores: torch.Tensor, s: PPOSettings, *, temperature: float,
               kl_coef: float) -> tuple[Trajectory, torch.Tensor]:
    """(Trajectory, non-score rewards [B, R]) of scored responses, without grad: policy and reference
    log-probs and values (3), per-token rewards -kl_coef * kl_t with the score on the last generated
    token (4), GAE advantages and returns, without a value function the return itself, whitened (5).
    `policy` is a `WithHead(model, value head)`; `reference()` gives a context in which it is the
    reference."""
    T, k = temperature, s.samples_per_prompt
    rmask = response_mask.float()
    full = s.kl_estimator == KLEstimator.FULL
    with torch.no_grad():
        logp, values, _, logits = policy_forward(policy, sequences, attention_mask, response_mask, k, T, with_logits=full)
        with reference():
            ref_logp, _, _, ref_logits = policy_forward(policy, sequences, attention_mask, response_mask, k, T,
                                                        values=False, with_logits=full)
        kl = kl_per_token(logp, ref_logp, s.kl_estimator, logits, ref_logits, T) * rmask
        rewards, non_score = per_token_rewards(scores, kl, rmask, kl_coef)
        if not s.use_value:
            values = torch.zeros_like(values)
        adv, returns = gae(rewards, values, rmask, s.gamma, s.lam if s.use_value else 1.0)
        if s.whiten_advantages:
            adv = whiten(adv, rmask)
    return Trajectory(sequences, attention_mask, rmask, logp, ref_logp, values, kl, scores, adv, returns), non_score


def ppo_update(model, traj: Trajectory, opt, c: PPOSettings, *, temperature: float, grad_clip: float,
               rng: random.Random, check=None) -> tuple[list[PPOStats], int]:
    """ppo_epochs passes over shuffled minibatches of the trajectory, one optimizer step each; a
    minibatch whose mean ratio exceeds ratio_threshold is skipped. `check(loss=, gradient_norm=)` runs
    before each optimizer step (the recipes stop on a non-finite value). Returns (stats, skipped)."""
    model.train()
    stats, skipped = [], 0
    k = c.samples_per_prompt
    n_groups, per = traj.sequences.shape[0] // k, max(1, c.mini_batch // k)  # minibatches of whole groups
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(c.ppo_epochs):
        order = torch.randperm(n_groups, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        for s in range(0, n_groups, per):
            rows = (order[s: s + per, None] * k + torch.arange(k)).flatten()
            mb = traj.select(rows.to(traj.sequences.device))
            logp, values, ent, _ = policy_forward(model, mb.sequences, mb.attention_mask, mb.response_mask, k,
                                                  temperature, with_entropy=True, detach_values=c.value_detach)
            pg_loss, vf_loss, st = ppo_losses(logp, mb.logprobs, values, mb.values, mb.advantages, mb.returns,
                                              mb.response_mask, cliprange=c.cliprange,
                                              cliprange_value=c.cliprange_value, entropy=ent)
            # a stale or broken minibatch (its update would be huge) is skipped on every rank if on one: under
            # DDP a rank that skipped its backward would leave the others waiting in theirs
            if all_reduce_max((st.ratio_mean > c.ratio_threshold).float()).item():
                skipped += 1
                opt.zero_grad(set_to_none=True)
                continue
            loss = pg_loss + c.vf_coef * vf_loss if c.use_value else pg_loss
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
            if check is not None:
                check(loss=loss.item(), gradient_norm=float(grad_norm))
            opt.step()
            opt.zero_grad(set_to_none=True)
            stats.append(st)
    return stats, skipped


@dataclass
class AdaptiveKLController:
    """Ziegler et al.: kl_coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon, kept >= minimum."""

    value: float = 0.2
    target: float = 6.0
    horizon: float = 10000.0
    minimum: float = 0.0

    def update(self, current_kl: float, n_steps: int) -> None:
        error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value = max(self.minimum, self.value * (1 + error * n_steps / self.horizon))

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
    return F.log_softmax(logits.float() / sampling_temperature(temperature), -1).gather(-1, tokens[..., None])[..., 0]


def sampling_temperature(temperature: float) -> float:
    """The temperature log-probs are taken at: greedy decoding (0) has none, so 1."""
    return temperature if temperature > 0 else 1.0


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    lp = F.log_softmax(logits.float() / sampling_temperature(temperature), -1)
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
    "PPOSettings",
    "PPOStats",
    "RunningMoments",
    "Trajectory",
    "ValueHead",
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
    "policy_forward",
    "ppo_update",
    "ppo_losses",
    "response_diversity",
    "trajectory",
    "whiten",
]
