"""Predicting peak training memory before a run.

peak = weights + trainable state + activations + logits/loss buffers + runtime overhead, with

- weights: fp parameters at their dtype; 4-bit linears at 0.5 byte/param plus absmax constants
  (fp32 per 64-block, or with double quantization 1 byte per block plus fp32 per 256 blocks);
  8-bit linears at 1 byte/param plus an fp32 scale per row.
- trainable state: LoRA A and B (r*(in+out) per wrapped linear) in fp32, their gradients, and the
  optimizer moments (AdamW: 8 bytes/param, 8-bit AdamW: 2 bytes/param). Full fine-tuning: every
  parameter with gradient and moments.
- activations saved for backward per token per layer, in the compute dtype: residual/norm inputs,
  q/k/v and attention output, MLP gate/up/act/product (about 10*D + 2*kvD + 4*I values), plus the
  LoRA inputs. With gradient checkpointing: one hidden state per layer, plus one layer's full
  activations while it is recomputed.
- logits: [B, T, V] in the compute dtype plus the fp32 copy and its gradient (or one chunk of
  `ce_chunk` tokens with the fused linear + cross-entropy).
- overhead: CPU: the Python/torch process itself; GPU: the CUDA context is not counted by
  max_memory_allocated, but allocator slack is (~5%).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minitune.errors import MinituneError
from minitune.lora import ALL_LINEAR, LLAMA_LINEARS, LoRAConfig
from minitune.model import ModelConfig
from minitune.quant import QuantConfig, QuantType

GiB = 2**30


@dataclass
class MemoryPlan:
    """What a training step holds, in the library's own types.

    batch: sequences per forward (DPO and reward models: both sides of each pair); seq: tokens per
    sequence; quant: the base's QuantConfig or None; lora: the adapter, or None for full
    fine-tuning; optimizer_state_bytes: per trainable parameter (AdamW 8, 8-bit AdamW 2)."""

    batch: int
    seq: int
    quant: QuantConfig | None = None
    lora: LoRAConfig | None = field(default_factory=LoRAConfig)
    dtype: torch.dtype = torch.float32
    optimizer_state_bytes: int = 8
    gradient_checkpointing: bool = False
    ce_chunk: int = 0
    device: str = "cpu"

CPU_PROCESS_BYTES = int(0.42 * GiB)  # python + torch + bitsandbytes + tokenizers, measured on this CPU


def linear_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    D, I, hd = c.hidden_size, c.intermediate_size, c.head_dim
    return {"q_proj": (D, c.num_attention_heads * hd), "k_proj": (D, c.num_key_value_heads * hd),
            "v_proj": (D, c.num_key_value_heads * hd), "o_proj": (c.num_attention_heads * hd, D),
            "gate_proj": (D, I), "up_proj": (D, I), "down_proj": (I, D)}


def estimate(c: ModelConfig, p: MemoryPlan) -> dict[str, int]:
    """Bytes by component and their total ("peak")."""
    L, D, V, I = c.num_hidden_layers, c.hidden_size, c.vocab_size, c.intermediate_size
    kvD = c.num_key_value_heads * c.head_dim
    shapes = linear_shapes(c)
    lin_params = L * sum(i * o for i, o in shapes.values())
    other = V * D * (1 if c.tie_word_embeddings else 2) + (2 * L + 1) * D
    b = torch.empty(0, dtype=p.dtype).element_size()
    q = p.quant
    if q is not None and q.is_4bit:
        blocks = lin_params / q.blocksize
        consts = blocks * 1 + blocks / 256 * 4 + 256 * 4 if q.double_quant else blocks * 4
        weights = lin_params / 2 + consts + other * b
    elif q is not None and q.quant_type == QuantType.INT8:
        weights = lin_params + L * sum(o for _, o in shapes.values()) * 4 + other * b
    else:
        weights = (lin_params + other) * b
    lora = p.lora
    targets = () if lora is None else LLAMA_LINEARS if lora.target_modules == ALL_LINEAR else tuple(lora.target_modules)
    r = 0 if lora is None else lora.r
    lora_params = L * r * sum(i + o for n, (i, o) in shapes.items() if n in targets)
    opt_bytes = p.optimizer_state_bytes
    if lora is None:
        trainable = (lin_params + other) * (b + opt_bytes)  # grads + moments (params already counted)
    else:
        trainable = lora_params * (4 + 4 + opt_bytes)
    tokens = p.batch * p.seq
    per_layer = (10 * D + 2 * kvD + 4 * I) * b + (sum(i for n, (i, _) in shapes.items() if n in targets) + 2 * r * len(targets)) * b
    if p.gradient_checkpointing:
        acts = tokens * (L * D * b + per_layer)
    else:
        acts = tokens * L * per_layer
    # attention scores are never materialized by SDPA's fused kernels on GPU; the CPU math path does.
    if p.device == "cpu":
        acts += p.batch * c.num_attention_heads * p.seq * p.seq * b * (1 if p.gradient_checkpointing else L)
    logit_tokens = min(tokens, p.ce_chunk) if p.ce_chunk else tokens  # the fused loss: one chunk of tokens
    logits = logit_tokens * V * (b + 4 + 4)
    overhead = CPU_PROCESS_BYTES if p.device == "cpu" else int(0.05 * (weights + trainable + acts + logits))
    parts = {"weights": int(weights), "trainable_state": int(trainable), "activations": int(acts),
             "logits": int(logits), "overhead": int(overhead)}
    parts["peak"] = sum(parts.values())
    return parts


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def check_fits(model_cfg: ModelConfig, plan: MemoryPlan, *, enforce: bool = True, report=print) -> dict[str, int]:
    """Prints the predicted peak and raises when it exceeds the free memory (unless `enforce` is
    false: run.memory_check in the recipes)."""
    device = torch.device(plan.device)
    est = estimate(model_cfg, plan)
    avail = available_bytes(device)
    if report is not None:
        parts = ", ".join(f"{k} {fmt(v)}" for k, v in est.items() if k != "peak")
        report(f"predicted peak memory: {fmt(est['peak'])} ({parts}); available: {fmt(avail)}")
    if est["peak"] > avail and enforce:
        raise MinituneError(
            f"this run is predicted to need {fmt(est['peak'])} but only {fmt(avail)} is free on {device}; lower "
            "run.batch_size or data.seq_length, enable model.gradient_checkpointing or a quantized base, or set "
            "run.memory_check=false to try anyway"
        )
    return est
