"""Predicting peak training memory before a run.

peak = weights + trainable state + activations + logits/loss buffers + runtime overhead, with

- weights: fp parameters at their dtype; 4-bit linears at 0.5 byte/param plus absmax constants
  (fp32 per 64-block, or with double quantization 1 byte per block plus fp32 per 256 blocks);
  8-bit linears at 1 byte/param plus an fp32 scale per row.
- trainable state: LoRA A and B (r*(in+out) per wrapped linear) in fp32, their gradients, and the
  optimizer moments (AdamW: 8 bytes/param, 8-bit AdamW: 2 bytes/param). Full fine-tuning: every
  parameter with gradient and moments.
- activations saved for backward per token per layer, in the compute dtype: 6*D + 2*kvD + 4*I
  values (3*I with compiled layers) plus the attention's logsumexp and the LoRA rank-r
  intermediates (measured with saved-tensor hooks; see `estimate`). With gradient checkpointing:
  one hidden state per layer (none on the accelerator when offloaded), plus one layer's full
  activations while it is recomputed.
- logits: [B, T, V] in the compute dtype plus the fp32 copy and its gradient (or one chunk of
  `ce_chunk` tokens with the fused linear + cross-entropy).
- overhead: CPU: the Python/torch process itself; GPU: the CUDA context is not counted by
  max_memory_allocated, but allocator slack is (~5%).

On CPU this predicts the live tensors. Peak RSS is higher by what glibc's allocator keeps after
tensors are freed (heap fragmentation, ~1.9x on an eager SmolLM2 step, ~1.3x compiled); with
`MALLOC_MMAP_THRESHOLD_=131072` freed tensors return to the OS and peak RSS meets the prediction
(benchmarks/memory.py --live-peak), at a ~35% speed cost from page faults.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minitune.attention import gqa_in_kernel
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
    compiled: bool = False  # compiled layers keep fewer activations (inductor recomputes the SwiGLU product)
    offload: bool = False  # with gradient checkpointing: the kept layer inputs live in host memory

CPU_RSS_OVER_LIVE = 1.9  # peak RSS / live-tensor peak of an eager SmolLM2 LoRA step on glibc (compiled: 1.3)
CPU_PROCESS_BYTES = int(0.36 * GiB)  # python + torch + minitune: RSS after loading SmolLM2 minus its weights, this CPU


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
    # Saved for backward per token per layer, measured with saved-tensor hooks on three shapes
    # (D/kvD/I = 576/192/1536, 512/512/2048, 1024/128/2816), fitted exactly by: residual input, two
    # norm outputs and rsqrt, q (post-RoPE), attention output and its reshaped copy = 6 D; k and v
    # = 2 kvD; gate, up, silu(gate), product = 4 I (compiled: 3 I); the attention's logsumexp (nh)
    # and each LoRA's rank-r intermediate.
    # Where SDPA has no fused kernel for grouped K/V (`gqa_in_kernel`), k and v are repeated to every query head.
    if c.num_key_value_heads != c.num_attention_heads and not gqa_in_kernel(p.device, p.dtype, c.head_dim, False,
                                                                             True, True):
        kvD = c.num_attention_heads * c.head_dim
    per_layer = (6 * D + 2 * kvD + (3 if p.compiled else 4) * I + c.num_attention_heads + r * len(targets)) * b
    if p.gradient_checkpointing:
        kept = 0 if p.offload and p.device != "cpu" else L * D * b
        acts = tokens * (kept + per_layer)
    else:
        acts = tokens * L * per_layer
    acts += tokens * 2 * c.head_dim * b  # RoPE cos/sin, shared by the layers
    if p.ce_chunk:  # the fused loss: one chunk's fp32 logits and exp buffer (+ its compute-dtype copies)
        logits = min(tokens, p.ce_chunk) * V * (4 + 4 + (2 * b if b != 4 else 0))
    else:  # logits in the compute dtype, the fp32 copy, log-softmax and its gradient
        logits = tokens * V * (b + 4 + 4)
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
    # On CPU the process holds more than its live tensors (see the module docstring): check against that.
    need = est["peak"] * (CPU_RSS_OVER_LIVE if device.type == "cpu" else 1.0)
    if report is not None:
        parts = ", ".join(f"{k} {fmt(v)}" for k, v in est.items() if k != "peak")
        extra = f"; up to {fmt(need)} resident with the CPU allocator's overhead" if need != est["peak"] else ""
        report(f"predicted peak memory: {fmt(est['peak'])} ({parts}){extra}; available: {fmt(avail)}")
    if need > avail and enforce:
        raise MinituneError(
            f"this run is predicted to need {fmt(need)} but only {fmt(avail)} is free on {device}; lower "
            "run.batch_size or data.seq_length, enable model.gradient_checkpointing or a quantized base, or set "
            "run.memory_check=false to try anyway"
        )
    return est
