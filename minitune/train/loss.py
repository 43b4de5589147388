"""The SFT loss: summed next-token cross-entropy, optionally over chunks of positions."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minitune.data.packing import IGNORE


def _ce_sum(h: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    logits = head(h).float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")


def cross_entropy_sum(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk: int = 0) -> torch.Tensor:
    """Summed next-token cross-entropy over labels != -100 (labels already aligned with `hidden`).

    With chunk > 0 the sequence is processed `chunk` positions at a time and each chunk's fp32
    logits are recomputed in the backward pass, so full [B, T, V] fp32 logits never exist at once.
    """
    if chunk <= 0 or hidden.shape[1] <= chunk:
        return _ce_sum(hidden, labels, head)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[1], chunk):
        h, y = hidden[:, s: s + chunk], labels[:, s: s + chunk]
        total = total + (checkpoint(_ce_sum, h, y, head, use_reentrant=False) if torch.is_grad_enabled() else _ce_sum(h, y, head))
    return total
