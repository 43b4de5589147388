"""The SFT loss: summed next-token cross-entropy over the labelled positions.

`cross_entropy_sum(hidden, labels, head, chunk)`:
- chunk > 0 and a plain linear head (the usual frozen or trained `lm_head`): the fused path. The
  output projection and the loss run together over `chunk` labelled tokens at a time, and each
  chunk's gradient with respect to the hidden states (and to the head's weight, when it trains) is
  computed right there in the forward pass. Neither [B, T, V] logits nor their fp32 copy, softmax or
  gradient ever exist; the peak holds one chunk's [chunk, V] fp32 logits. Backward only scales the
  stored gradients. Same FLOPs as the plain path and no recompute.
- Only positions whose label is not -100 are projected at all (prompt tokens under completion-only
  training, padding, document ends), on every path.
- chunk = 0, or a head that is not a plain nn.Linear (LoRA on lm_head, a quantized head): logits of
  the labelled positions at once, fp32 cross-entropy (the reference the fused path is tested against).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minitune.cpu_linear import is_plain_linear
from minitune.data.packing import IGNORE


def _plain_ce_sum(h: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:
    logits = head(h)
    return F.cross_entropy(_upcast(logits), labels, reduction="sum")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64, for gradient checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) over rows h [N, D], W [V, D], computed `chunk` rows at a time.

    The gradients are produced in the forward pass (softmax - onehot, per chunk) and kept: d/dh
    [N, D] in h's dtype and, when W trains, d/dW [V, D] accumulated in fp32.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, yc = h[s: s + chunk], labels[s: s + chunk]
            logits = _upcast(hc @ weight.t())  # [c, V]: the only vocabulary-sized buffer
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place over the logits
                probs[torch.arange(len(yc), device=yc.device), yc] -= 1.0  # d loss / d logits
                d = probs.to(h.dtype)
                if need_h:
                    grad_h[s: s + chunk] = d @ weight
                if need_w:
                    grad_w += d.t() @ hc
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def fusable(head: nn.Module) -> bool:
    """A plain nn.Linear without bias: what the fused path computes (LoRA or quantized heads are not)."""
    return is_plain_linear(head) and head.bias is None


def cross_entropy_sum(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk: int = 0) -> torch.Tensor:
    """Summed next-token cross-entropy over labels != -100 (labels already aligned with `hidden`
    [B, T, D]); see the module docstring for the paths."""
    keep = labels.flatten() != IGNORE
    h = hidden.flatten(0, 1)[keep]  # [N, D]: only labelled positions reach the vocabulary projection
    y = labels.flatten()[keep]
    if h.shape[0] == 0:
        return hidden.sum() * 0.0  # no labelled token: zero loss, gradients of zero reach the graph
    if chunk > 0 and fusable(head):
        return FusedLinearCrossEntropy.apply(h, head.weight, y, chunk)
    return _plain_ce_sum(h, y, head)
