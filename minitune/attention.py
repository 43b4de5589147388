"""Attention over packed blocks without a dense mask.

A packed block holds several documents whose positions restart; each token may attend only to
earlier tokens of its own document. Three ways to compute that, chosen per model with
`set_attention(model, impl)` (a transform on a built model; "auto" by default):

- "sdpa": a dense boolean [B, 1, T, T] mask. Always available; it keeps SDPA off its fused causal
  kernels and costs T*T memory. Also the path for padding masks and KV-cache prefill/decode.
- "segments": one causal SDPA call per document (varlen attention written as a loop). No mask, the
  fused kernels, and no work across documents. The CPU default for blocks of 1024+ tokens:
  3x (T=2048) to 16x (T=8192) faster than the dense mask there (benchmarks/attention.py); below
  that the per-call overhead loses to the small dense mask, which "auto" then picks.
- "flex": `flex_attention` with a document block mask built once per forward; fully masked blocks
  are skipped. The CUDA default (compiled once; torch.compile of the layers composes with it).

Each gives the same outputs (tests/test_attention.py: packed documents equal each document alone on
every path, and gradients equal across paths).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend

from minitune.errors import MinituneError


class AttentionImpl(str, Enum):
    AUTO = "auto"
    SDPA = "sdpa"
    SEGMENTS = "segments"
    FLEX = "flex"


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] id of the packed document each token belongs to: a new one starts wherever the
    position does not grow (a restart at 0, or a pad)."""
    start = torch.ones_like(position_ids, dtype=torch.bool)
    start[:, 1:] = position_ids[:, 1:] <= position_ids[:, :-1]
    return start.cumsum(dim=1)


def has_restarts(position_ids: torch.Tensor) -> bool:
    return position_ids.shape[1] > 1 and bool((position_ids[:, 1:] <= position_ids[:, :-1]).any())


def dense_mask(q_len: int, kv_len: int, *, position_ids: torch.Tensor | None, padding_mask: torch.Tensor | None,
               device, restarts: bool | None = None) -> torch.Tensor | None:
    """Boolean mask [B, 1, q_len, kv_len] (True = attend), or None when plain causal suffices.

    Queries are the last `q_len` of `kv_len` keys. Packed documents (position restarts) are
    isolated from each other, padded keys are hidden, and every query keeps itself so that no row
    is fully masked (SDPA would return NaN).
    """
    if restarts is None:
        restarts = position_ids is not None and q_len == kv_len and has_restarts(position_ids)
    if padding_mask is None and not restarts:
        return None
    offset = kv_len - q_len
    q_idx = torch.arange(q_len, device=device)[:, None] + offset
    k_idx = torch.arange(kv_len, device=device)[None, :]
    mask = (k_idx <= q_idx)[None]  # (1, q, kv)
    if restarts:
        doc = document_ids(position_ids)
        mask = mask & (doc[:, :, None] == doc[:, None, :])
    if padding_mask is not None:
        mask = mask & padding_mask[:, None, :kv_len].bool()
    mask = mask | (k_idx == q_idx)[None]
    return mask[:, None]  # (B, 1, q, kv)


@dataclass(frozen=True)
class Segments:
    """Per row, the (start, length) of each document; a run of one-token documents (padding at a
    block's end) is one entry with length -n: a token alone attends to itself, so its output is v."""

    rows: tuple[tuple[tuple[int, int], ...], ...]

    @classmethod
    def from_positions(cls, position_ids: torch.Tensor) -> "Segments":
        rows = []
        for doc in document_ids(position_ids).cpu():
            _, counts = torch.unique_consecutive(doc, return_counts=True)
            runs, s = [], 0
            for c in counts.tolist():
                if c == 1 and runs and runs[-1][1] < 0:
                    runs[-1] = (runs[-1][0], runs[-1][1] - 1)
                else:
                    runs.append((s, c if c > 1 else -1))
                s += c
            rows.append(tuple(runs))
        return cls(tuple(rows))


def _block_mask(position_ids: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    doc = document_ids(position_ids)
    B, T = doc.shape

    def same_document_causal(b, h, q, kv):
        return (q >= kv) & (doc[b, q] == doc[b, kv])

    return create_block_mask(same_document_causal, B, None, T, T, device=doc.device)


class DocumentMask(NamedTuple):
    """The dense mask of packed documents without padding (training on packed blocks): GQA goes through
    `sdpa` here, as on the unmasked path."""

    mask: torch.Tensor


def plan(q_len: int, kv_len: int, *, position_ids: torch.Tensor | None, padding_mask: torch.Tensor | None,
         impl: AttentionImpl, device):
    """What `attend` needs for one forward: None (causal), a padding mask (dense tensor), a
    DocumentMask, Segments or a BlockMask. A boolean [B, 1, q_len, kv_len] `padding_mask` is an
    explicit mask and is used as it is (shared-prompt preference pairs, `data/shared_prompt.py`)."""
    if padding_mask is not None and padding_mask.dim() == 4:
        if padding_mask.dtype != torch.bool or padding_mask.shape[-2:] != (q_len, kv_len):
            raise MinituneError(f"an explicit attention mask must be bool [B, 1, {q_len}, {kv_len}], got "
                                f"{padding_mask.dtype} {tuple(padding_mask.shape)}")
        return padding_mask
    restarts = position_ids is not None and q_len == kv_len and has_restarts(position_ids)
    if restarts and padding_mask is None:
        impl = resolve(impl, torch.device(device), q_len)
        if impl == AttentionImpl.SEGMENTS:
            return Segments.from_positions(position_ids)
        if impl == AttentionImpl.FLEX:
            if torch.device(device).type == "cpu" and torch.is_grad_enabled():
                raise MinituneError("model.attention=flex trains only on CUDA (flex_attention has no CPU "
                                    "backward); use model.attention=auto or segments on CPU")
            return _block_mask(position_ids)
        return DocumentMask(dense_mask(q_len, kv_len, position_ids=position_ids, padding_mask=None, device=device,
                                       restarts=True))
    return dense_mask(q_len, kv_len, position_ids=position_ids, padding_mask=padding_mask, device=device,
                      restarts=restarts)


# On CPU one SDPA call per document costs a fixed overhead per call, the dense mask costs T^2: the
# loop wins from about this block length on (benchmarks/results/attention_packed_cpu.md: 0.61x the
# dense mask's time at T=1024, 0.33x at 2048, 0.06x at 8192; 1.4-1.9x its time at 256-512).
SEGMENTS_FROM_T = 1024


def resolve(impl: AttentionImpl, device: torch.device, seq_len: int) -> AttentionImpl:
    """What "auto" means for packed blocks of seq_len tokens on `device`."""
    impl = AttentionImpl(impl)
    if impl != AttentionImpl.AUTO:
        return impl
    if device.type == "cuda":
        return AttentionImpl.FLEX
    return AttentionImpl.SEGMENTS if seq_len >= SEGMENTS_FROM_T else AttentionImpl.SDPA


@functools.cache
def _flex_compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _gqa_in_kernel(device_type: str, dtype: torch.dtype, head_dim: int, masked: bool, causal: bool, grad: bool) -> bool:
    dev = torch.device(device_type)
    q = torch.zeros(1, 2, 4, head_dim, device=dev, dtype=dtype, requires_grad=grad)
    kv = torch.zeros(1, 1, 4, head_dim, device=dev, dtype=dtype)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool, device=dev) if masked else None
    try:
        choose = torch._fused_sdp_choice  # what SDPA dispatches to for these inputs
        grouped = choose(q, kv, kv, attn_mask=mask, is_causal=causal and not masked, enable_gqa=True)
        repeated = choose(q, kv.expand(1, 2, 4, head_dim), kv.expand(1, 2, 4, head_dim), attn_mask=mask,
                          is_causal=causal and not masked)
    except Exception:  # no such op in this build, or no such device here (a plan for a GPU made on a CPU)
        return True
    math = int(SDPBackend.MATH)
    return grouped != math or repeated == math


@torch.compiler.assume_constant_result  # decided once per kind of call, also inside a compiled layer
def gqa_in_kernel(device_type: str, dtype: torch.dtype, head_dim: int, masked: bool, causal: bool, grad: bool) -> bool:
    """Whether SDPA takes grouped K/V (`enable_gqa`) in a fused kernel for such a call. Where none does, SDPA
    falls back to its math kernel, which materializes the [B, nh, T, S] scores (and keeps them for the
    backward): on CPU before torch 2.9 (the flash kernel learnt GQA in pytorch#157893), and on CUDA wherever
    flash attention cannot run (a mask, fp32) in the torch versions whose memory-efficient kernel lacks GQA.
    There K/V repeated to every query head keep the fused kernel: O(T) more memory instead of O(T^2)."""
    return _gqa_in_kernel(device_type, dtype, head_dim, masked, causal, grad)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
         is_causal: bool = False) -> torch.Tensor:
    """`F.scaled_dot_product_attention` of q [B, nh, T, hd] over k/v [B, nkv, S, hd]: each kv head serves
    nh // nkv query heads inside the kernel (no repeated copy of K/V, which autograd would also keep) where a
    fused kernel takes that, else K/V repeated first (see `gqa_in_kernel`)."""
    if q.shape[1] == k.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    if gqa_in_kernel(q.device.type, q.dtype, q.shape[-1], attn_mask is not None, is_causal, q.requires_grad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=True)
    return F.scaled_dot_product_attention(q, repeat_heads(k, q.shape[1]), repeat_heads(v, q.shape[1]),
                                          attn_mask=attn_mask, is_causal=is_causal)


def repeat_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """[B, nkv, S, hd] -> [B, n_head, S, hd], each kv head repeated for its n_head // nkv query heads in turn."""
    B, nkv, S, hd = x.shape
    return x[:, :, None].expand(B, nkv, n_head // nkv, S, hd).reshape(B, n_head, S, hd)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """q [B, nh, T, hd], k/v [B, nkv, S, hd] -> [B, nh, T, hd] under `mask` (see `plan`)."""
    gqa = q.shape[1] != k.shape[1]
    if isinstance(mask, Segments):
        return _attend_segments(q, k, v, mask)
    if isinstance(mask, DocumentMask):
        return sdpa(q, k, v, attn_mask=mask.mask)
    if mask is not None and not torch.is_tensor(mask):  # a flex BlockMask
        from torch.nn.attention.flex_attention import flex_attention

        fn = _flex_compiled() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
        return fn(q, k, v, block_mask=mask, enable_gqa=gqa)
    if mask is None:
        return sdpa(q, k, v, is_causal=q.shape[2] > 1 and k.shape[2] == q.shape[2])
    if gqa:
        # Under a padding mask (reward, DPO, PPO, prefill) K/V are repeated, as the published RL results were
        # computed: SDPA's own GQA backward sums the group's gradients in another order, and RL
        # trajectories amplify that rounding (the toy PPO test's KL went from <= 8.1 to 10.1).
        k, v = repeat_heads(k, q.shape[1]), repeat_heads(v, q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@torch.compiler.disable  # lengths are data: a compiled layer calls this eagerly instead of recompiling
def _attend_segments(q, k, v, segs: Segments) -> torch.Tensor:
    rows = []
    for b, runs in enumerate(segs.rows):
        parts = []
        for s, n in runs:
            if n < 0:  # one-token documents: each attends to itself alone
                parts.append(repeat_heads(v[b:b + 1, :, s:s - n], q.shape[1]))
            else:
                parts.append(sdpa(q[b:b + 1, :, s:s + n], k[b:b + 1, :, s:s + n], v[b:b + 1, :, s:s + n],
                                  is_causal=n > 1))
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


def set_attention(model: nn.Module, impl: AttentionImpl | str) -> nn.Module:
    """Chooses how `model` attends within packed blocks (see the module docstring)."""
    try:
        impl = AttentionImpl(impl)
    except ValueError:
        raise MinituneError(f"model.attention must be one of {', '.join(i.value for i in AttentionImpl)}, "
                            f"got {impl!r}") from None
    if impl == AttentionImpl.FLEX:
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError:
            raise MinituneError("model.attention=flex needs torch >= 2.5 (flex_attention); use auto or sdpa") from None
    model.attention = impl
    return model
