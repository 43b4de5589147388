"""The Llama-family decoder in plain torch.

One module covers Llama 2/3/3.1/3.2, Mistral, Qwen2 and SmolLM/SmolLM2 as Hugging Face configures
them. Parameter names equal Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so
checkpoints and PEFT adapters need no key remapping. This file knows nothing about LoRA,
quantization or distribution: those are transforms applied to a built model from outside.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from minitune.attention import AttentionImpl, attend, gqa_in_kernel, plan
from minitune.errors import MinituneError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False  # q/k/v(/o) bias: Qwen2 has q/k/v bias only
    o_proj_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Everything else from config.json, kept so that save_model writes back what it read.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise MinituneError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Builds a config from a Hugging Face `config.json` dict; raises for unsupported families."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise MinituneError(
                f"unsupported model_type {model_type!r} in config.json; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        hf = dict(hf)
        # transformers >= 5 nests rope settings in `rope_parameters`; older files use the flat keys.
        rope = hf.pop("rope_parameters", None)
        if rope:
            hf.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                hf.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        scaling = hf.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
            hf["rope_scaling"] = None
        known = {f.name for f in fields(cls)} - {"extra", "o_proj_bias"}
        kwargs = {k: v for k, v in hf.items() if k in known}
        if model_type == "qwen2":
            kwargs["attention_bias"] = True  # Qwen2 always has q/k/v bias and no o_proj bias
            kwargs.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
        else:
            kwargs["o_proj_bias"] = bool(hf.get("attention_bias", False))
        extra = {k: v for k, v in hf.items() if k not in known}
        return cls(**kwargs, extra=extra)

    def to_hf(self) -> dict:
        """The `config.json` dict that transformers reads back to the same model."""
        out = dict(self.extra)
        for f in fields(self):
            if f.name in ("extra", "o_proj_bias"):
                continue
            out[f.name] = getattr(self, f.name)
        if self.model_type == "qwen2":
            out.pop("attention_bias", None)
        out.pop("rope_parameters", None)
        out.setdefault("architectures", [_ARCH_NAMES[self.model_type]])
        out.setdefault("hidden_act", "silu")
        return out


_ARCH_NAMES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


# ----------------------------------------------------------------------------------------------
# RoPE as pure functions


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32, with `linear` or `llama3` scaling applied."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    sc = cfg.rope_scaling
    if not sc:
        return inv_freq
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        return inv_freq / sc["factor"]
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_ctx = sc["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / lo, old_ctx / hi
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled)
    raise MinituneError(f"unsupported rope_scaling type {kind!r}; supported: linear, llama3")


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables [B, T, head_dim] for the given positions, computed in fp32."""
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [B, nh, T, hd] by the half-split convention Hugging Face Llama uses."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ----------------------------------------------------------------------------------------------
# Modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 and cast back before the scale, exactly as Hugging Face does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class KVCache(nn.Module):
    """Preallocated keys/values [B, n_kv, max_len, hd] for one layer."""

    def __init__(self, batch: int, n_kv: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Writes k/v [B, n_kv, T, hd] into the cache.

        pos an int: at [pos, pos+T); returns the keys/values up to pos+T (prefill: shapes follow T).
        pos a LongTensor [T] of cache slots: written in place there; returns the whole buffers, so
        every decode step has the same shapes (the caller masks the slots not yet written).
        """
        if torch.is_tensor(pos):
            self.k.index_copy_(2, pos, k)
            self.v.index_copy_(2, pos, v)
            return self.k, self.v
        end = pos + k.shape[2]
        if end > self.k.shape[2]:
            raise MinituneError(f"KV cache holds {self.k.shape[2]} positions, writing up to {end}; "
                                "set up the cache with a larger max_len")
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def grouped_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of a few query tokens q [B, nh, T, hd] over a cache k, v [B, nkv, S, hd] where the boolean
    mask [B, 1, T|1, S] is True, as two batched matmuls: the query heads that share a kv head are stacked
    as rows of one product (no repeated K/V), softmax in fp32. torch's CPU SDPA runs one bf16/fp16 query
    token 4-8x slower than this (its flash kernel tiles for long queries; measured at 8-256 rows with
    SmolLM2's 9 query / 3 kv heads), so the reduced-precision static decode step on CPU uses it; fp32 keeps
    SDPA (within 1.5x either way, and the recorded runs' sampled tokens stay what they were) where SDPA has a
    fused kernel for grouped K/V (`minitune.attention.gqa_in_kernel`), and uses this where it has none."""
    B, nh, T, hd = q.shape
    nkv, S = k.shape[1], k.shape[2]
    r = nh // nkv
    s = torch.matmul(q.reshape(B, nkv, r * T, hd), k.transpose(-1, -2)).float() * hd ** -0.5
    s = s.view(B, nkv, r, T, S).masked_fill(~mask.view(B, 1, 1, -1, S), float("-inf"))
    p = s.softmax(-1).to(v.dtype).view(B, nkv, r * T, S)
    return torch.matmul(p, v).view(B, nh, T, hd)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, cache_pos: int | torch.Tensor):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(cache_pos, k, v)  # (B, nkv, S, hd)
        if torch.is_tensor(cache_pos):
            # Static decode over the whole cache: the mask (from the caller) hides unwritten slots,
            # and SDPA shares each kv head across its query heads without copying K/V; where no fused
            # kernel would (see `gqa_in_kernel`), two grouped matmuls do, rather than SDPA's math
            # kernel repeating the whole cache every step.
            gqa = self.n_kv != self.n_head
            if (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)) or (
                    gqa and not gqa_in_kernel(q.device.type, q.dtype, self.hd, True, False, q.requires_grad)):
                y = grouped_decode_attention(q, k, v, mask)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))
        y = attend(q, k, v, mask)  # (B, nh, T, hd): causal, dense mask, per document or flex
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache_pos: int | torch.Tensor = 0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class ModelOutput(NamedTuple):
    """logits: [B, T, V] (None when not asked for); hidden: [B, T, D] final-norm hidden states."""

    logits: torch.Tensor | None
    hidden: torch.Tensor


class Transformer(nn.Module):
    """Decoder-only LM. `model.model` holds the decoder and `model.lm_head` the output projection,
    mirroring Hugging Face's parameter names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.attention = AttentionImpl.AUTO  # packed blocks: see minitune.attention.set_attention
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def tie_weights(self):
        """Re-ties lm_head to the embedding after parameters were replaced (meta loading)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None):
        """Random init for tiny test models and benchmarks (real weights come from checkpoints)."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.normal_(0.0, std, generator=generator)
                else:
                    p.normal_(0.0, std, generator=generator)

    # -- KV cache ----------------------------------------------------------------------------
    def setup_cache(self, batch: int, max_len: int, dtype=None, device=None):
        ref = self.model.norm.weight
        dtype, device = dtype or ref.dtype, device or ref.device
        c = self.config
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(batch, c.num_key_value_heads, max_len, c.head_dim, dtype, device)

    def repeat_cache(self, n: int):
        """Each cached row repeated n times in place (row i becomes rows i*n .. i*n+n-1): several
        samples of one prompt share its prefill."""
        for layer in self.model.layers:
            c = layer.self_attn.kv_cache
            c.k, c.v = c.k.repeat_interleave(n, 0), c.v.repeat_interleave(n, 0)

    def select_cache(self, rows: torch.Tensor):
        """Keeps only the cached rows `rows` ([b] indices), in that order: generation drops the rows
        that finished, so later decode steps compute only the rows still generating."""
        for layer in self.model.layers:
            c = layer.self_attn.kv_cache
            c.k, c.v = c.k.index_select(0, rows), c.v.index_select(0, rows)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    # -- forward -----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        cache_pos: int | torch.Tensor = 0,
        return_logits: bool = True,
        logits_from: int = 0,
        logits_at: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Runs the decoder.

        input_ids: [B, T]. position_ids: [B, T]; positions that restart (packing) isolate
        documents. attention_mask: [B, S] padding mask over the cache plus these tokens (1 = real),
        S = cache_pos + T. cache_pos: where these tokens start in the KV cache (set up with
        `setup_cache`). Static decode: cache_pos a LongTensor [T] of cache slots and attention_mask
        a bool [B, max_len] over the whole cache, True where a key may be attended (written slots,
        not pads, the new tokens included); position_ids are then required. Returns logits [B, T - logits_from, V] and the final hidden states [B, T, D];
        `logits_from` skips the output projection where no prediction is needed (PPO's prompt part);
        `logits_at` ([M] flat indices into the B*T positions) projects only those: logits [M, V].
        attention_mask may also be an explicit bool mask [B, 1, T, S] (True = attend; see
        `minitune.data.shared_prompt`).
        """
        B, T = input_ids.shape
        static = torch.is_tensor(cache_pos)
        if position_ids is None:
            if static:
                raise MinituneError("a static decode step (cache_pos a tensor) needs position_ids")
            position_ids = torch.arange(cache_pos, cache_pos + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = rope_cos_sin(position_ids, rope_inv_freq(self.config, x.device), x.dtype)
        if static:
            mask = attention_mask[:, None, None, :]  # (B, 1, 1, max_len)
        else:
            mask = plan(T, cache_pos + T, position_ids=position_ids, padding_mask=attention_mask,
                        impl=self.attention, device=x.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache_pos)
        h = self.model.norm(x)
        if logits_at is not None:
            return ModelOutput(self.lm_head(h.flatten(0, 1)[logits_at]), h)
        return ModelOutput(self.lm_head(h[:, logits_from:] if logits_from else h) if return_logits else None, h)


def build_model(cfg: ModelConfig, *, device="cpu", dtype=torch.float32, seed: int | None = 0) -> Transformer:
    """A randomly initialized model (tests, benchmarks). Real weights: `minitune.load_model`."""
    with torch.device(device):
        model = Transformer(cfg)
    if device != "meta":
        g = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        model.init_weights(generator=g)
    return model.to(dtype)


def param_bytes(module: nn.Module) -> int:
    """Bytes held by distinct parameter and buffer storages (tied weights counted once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def count_params(module: nn.Module) -> dict[str, Any]:
    """Counts of trainable and total parameters (tied weights counted once)."""
    seen, total, trainable = set(), 0, 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}
