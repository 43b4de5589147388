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
        acc = torch.promote_types(h.dtype, torch.float32)
        total = torch.zeros((), dtype=acc, device=h.device)
        # One buffer serves every chunk and every pass over it runs in place: on CPU a fresh
        # vocabulary-sized tensor per chunk (and per softmax step) costs its page faults again. The
        # logits are held transposed, [V, c] = W @ h_c^T: MKL runs that product ~20% faster than
        # h_c @ W^T on CPU (the softmax reduces over dim 0 instead).
        buf = torch.empty(weight.shape[0] * min(chunk, h.shape[0]), dtype=acc, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, yc = h[s: s + chunk], labels[s: s + chunk]
            n = hc.shape[0]
            logits = buf[: weight.shape[0] * n].view(weight.shape[0], n)  # [V, c]: the only vocabulary-sized buffer
            if hc.dtype == acc:  # (the product needs weight in hc's dtype either way)
                torch.mm(weight, hc.t(), out=logits)
            else:  # bf16/fp16: the product in that dtype, upcast into the buffer
                logits.copy_(weight @ hc.t())
            cols = torch.arange(n, device=yc.device)
            target = logits[yc, cols]
            top = logits.amax(dim=0)
            z = logits.sub_(top).exp_().sum(dim=0)  # logits now hold exp(logit - max)
            total += (top + z.log() - target).sum()  # log-sum-exp minus the target's logit
            if need_h or need_w:
                probs = logits.div_(z)  # softmax
                probs[yc, cols] -= 1.0  # d loss / d logits
                d = probs.to(h.dtype)
                if need_h:  # d, weight and grad_h all have h's dtype
                    torch.mm(d.t(), weight, out=grad_h[s: s + n])
                if need_w:
                    grad_w += d @ hc
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
