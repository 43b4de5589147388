"""GRPO's algorithm pieces as plain functions (the loop is recipes/grpo.py).

Shapes: B = n_groups * G responses, contiguous per prompt (rows i*G .. i*G+G-1 answer prompt i);
R response tokens, right-padded, mask 1 up to and including the EOS.

- advantages: each response's score against its group, (s - mean) / (std + eps) (DeepSeekMath's
  GRPO, std unbiased as TRL computes it), or s - mean alone (Dr. GRPO: dividing by a small std
  over-weights near-solved prompts); one advantage for every token of the response.
- loss per token: the clipped surrogate with separate low/high ranges (DAPO's clip-higher),
  plus beta * k3 KL to the reference (Schulman's unbiased, always >= 0 estimator).
- aggregation: "token" averages over every response token of the batch (DAPO: long answers
  are not down-weighted), "sequence" averages each response over its own tokens first (the
  original GRPO).
- groups whose scores are all equal have advantage 0 for every answer: they carry no signal,
  and the recipe skips them before the update forward.
- guidance (optional): a group with no answer as good as the prompt's reference answer gets the
  reference in place of its worst answer (`rows_to_guide`).
"""
from __future__ import annotations

from enum import Enum
from typing import NamedTuple

import torch

from minitune.distributed import all_reduce_sum, world_size
from minitune.errors import MinituneError


class Aggregation(str, Enum):
    TOKEN = "token"  # sum over all response tokens / number of response tokens (DAPO)
    SEQUENCE = "sequence"  # mean over each response's tokens, then mean over responses (GRPO)


class GRPOStats(NamedTuple):
    """Scalars of one update (detached): loss, clipped-token shares (low side, high side), mean
    k3 KL per token, mean ratio."""

    loss: torch.Tensor
    clip_low: torch.Tensor
    clip_high: torch.Tensor
    kl: torch.Tensor
    ratio: torch.Tensor


def _groups(scores: torch.Tensor, group: int) -> torch.Tensor:
    if group < 2 or scores.dim() != 1 or scores.numel() % group:
        raise MinituneError(f"GRPO compares the answers to one prompt with each other: {scores.numel()} scores do not "
                            f"split into groups of {group} (need a group size >= 2 that divides the rollout)")
    return scores.view(-1, group)


def group_advantages(scores: torch.Tensor, group: int, *, scale: bool = True, eps: float = 1e-4,
                     negative_weight: float = 1.0) -> torch.Tensor:
    """[B] advantages: score minus its group's mean, divided by the group's (unbiased) std + eps
    when `scale` (GRPO), not divided when not (Dr. GRPO). A group of equal scores gives zeros.
    Below-mean answers' advantages are multiplied by `negative_weight` (1: GRPO; 0: only the answers
    better than their group's mean are reinforced, as rejection-sampling fine-tuning does)."""
    g = _groups(scores, group).float()
    adv = g - g.mean(1, keepdim=True)
    if scale:
        adv = adv / (g.std(1, keepdim=True) + eps)
    if negative_weight != 1.0:
        adv = torch.where(adv < 0, adv * negative_weight, adv)
    return adv.flatten()


def informative_groups(scores: torch.Tensor, group: int) -> torch.Tensor:
    """[n_groups] bool: True where the group's scores are not all equal (its advantages are not all 0)."""
    g = _groups(scores, group)
    return (g != g[:, :1]).any(1)


def rows_to_guide(scores: torch.Tensor, reference_scores: torch.Tensor, group: int) -> list[int]:
    """Off-policy guidance (LUFFY, Yan et al. 2025): for each group none of whose answers scores as
    well as the prompt's reference answer ([n_groups] `reference_scores`), the row of its
    lowest-scoring answer (the first of equals), where the reference answer goes. Such a group would
    otherwise carry no signal (all wrong under exact match) or only a weak one (partial credit); with
    the reference in it, the update raises the right answer's likelihood on prompts the policy never
    samples right. Empty when every group has an answer as good as its reference."""
    g = _groups(scores, group)
    if reference_scores.shape != (g.shape[0],):
        raise MinituneError(f"{reference_scores.numel()} reference scores for {g.shape[0]} groups")
    need = (g < reference_scores[:, None].to(g.dtype)).all(1)
    return [int(i) * group + int(g[i].argmin()) for i in need.nonzero().flatten()]


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate exp(r) - r - 1 with r = ref_logp - logp: unbiased
    for samples from the policy, and >= 0 for every sample."""
    r = ref_logp - logp
    return torch.exp(r) - r - 1


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, *,
                      clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token loss [B, R], clipped-below mask, clipped-above mask):
    -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) with A [B] broadcast over tokens."""
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * a
    # where the clipped term is the smaller one, the gradient is zero: the update went far enough
    is_clipped = clipped < unclipped
    return -torch.min(unclipped, clipped), is_clipped & (ratio < 1 - clip_low), is_clipped & (ratio > 1 + clip_high)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: Aggregation, *, total_tokens: float | None = None,
              total_sequences: float | None = None) -> torch.Tensor:
    """Scalar loss from per-token values [B, R]. `total_tokens` / `total_sequences` are the whole
    minibatch's counts when it is split into micro-batches whose gradients are summed (so the sum
    over micro-batches equals the loss of the whole minibatch); by default this batch's own."""
    mask = mask.to(per_token.dtype)
    if how == Aggregation.TOKEN:
        n = mask.sum() if total_tokens is None else total_tokens
        return (per_token * mask).sum() / _positive(n)
    per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
    n = per_token.shape[0] if total_sequences is None else total_sequences
    return per_seq.sum() / _positive(n)


def _positive(n) -> float:
    """A count to divide by: itself, or 1 where it is 0 (a batch with nothing to average sums to 0 anyway).
    Not clamped to >= 1: a rank's share of the global count (`global_counts`) may be a fraction."""
    n = float(n)
    return n if n > 0 else 1.0


def global_counts(mask: torch.Tensor, row_weight: torch.Tensor) -> tuple[float, float]:
    """(tokens, sequences) to pass as `total_tokens` / `total_sequences` on every rank: the counts of the
    minibatch over all ranks, divided by the world size. DDP and FSDP2 average the ranks' gradients, so
    with these the result is the gradient of the token-mean (sequence-mean) over the whole global minibatch,
    as one process would compute it, rather than the mean of each rank's own mean: a rank whose groups all
    scored alike (weight 0) would otherwise halve the others' update on 2 ranks. One process: the plain counts."""
    counts = all_reduce_sum(torch.stack([mask.float().sum(), row_weight.float().sum()]))
    return counts[0].item() / world_size(), counts[1].item() / world_size()


def global_token_means(stats: list[GRPOStats], tokens: list[torch.Tensor]) -> dict[str, float]:
    """The update statistics (clip shares, KL, ratio) as token-weighted means over every micro-batch of
    every rank: each micro-batch's per-token means weighted by its `tokens` (trained response tokens),
    summed over ranks. What one process computing the whole minibatch would log; a rank's own mean of
    micro-batch means would weigh a short micro-batch as much as a long one and show rank 0's figures only."""
    fields = ("clip_low", "clip_high", "kl", "ratio")
    w = torch.stack([torch.as_tensor(t, dtype=torch.float32) for t in tokens]).to(stats[0].kl.device)
    sums = torch.stack([(torch.stack([getattr(s, k).float() for s in stats]) * w).sum() for k in fields] + [w.sum()])
    sums = all_reduce_sum(sums)
    return {k: (sums[i] / _positive(sums[-1])).item() for i, k in enumerate(fields)}


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              clip_low: float = 0.2, clip_high: float = 0.28, beta: float = 0.0, ref_logp: torch.Tensor | None = None,
              aggregation: Aggregation = Aggregation.TOKEN, total_tokens: float | None = None,
              total_sequences: float | None = None) -> tuple[torch.Tensor, GRPOStats]:
    """(loss, GRPOStats): clipped surrogate + beta * k3 KL, aggregated over response tokens."""
    per_token, low, high = clipped_surrogate(logp, old_logp, advantages, clip_low=clip_low, clip_high=clip_high)
    kl = torch.zeros_like(per_token)
    if beta:
        if ref_logp is None:
            raise MinituneError("a KL term (beta > 0) needs the reference log-probs")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, aggregation, total_tokens=total_tokens, total_sequences=total_sequences)
    m = mask.to(per_token.dtype)
    n = m.sum().clamp(min=1)
    stats = GRPOStats(loss.detach(), (low * m).sum() / n, (high * m).sum() / n, (kl.detach() * m).sum() / n,
                      (torch.exp(logp - old_logp).detach() * m).sum() / n)
    return loss, stats


__all__ = ["Aggregation", "GRPOStats", "aggregate", "clipped_surrogate", "global_counts", "global_token_means",
           "group_advantages", "grpo_loss", "informative_groups", "k3_kl", "rows_to_guide"]
