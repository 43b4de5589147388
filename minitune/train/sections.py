"""Config sections shared by the recipes. Each recipe's config is a dataclass made of these."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from minitune.data.formats import Template
from minitune.errors import MinituneError, require
from minitune.lora import LoRAConfig, LoRAInit
from minitune.quant import QuantConfig, QuantType, as_dtype


class QuantMode(str, Enum):
    NONE = "none"
    NF4 = "nf4"
    FP4 = "fp4"
    INT8 = "int8"


class Parallel(str, Enum):
    NONE = "none"
    DDP = "ddp"
    FSDP = "fsdp"


class Schedule(str, Enum):
    COSINE = "cosine"
    LINEAR = "linear"
    CONSTANT = "constant"


class Optimizer(str, Enum):
    ADAMW = "adamw"
    ADAMW_8BIT = "adamw8bit"
    PAGED_ADAMW = "paged_adamw"
    PAGED_ADAMW_8BIT = "paged_adamw8bit"


@dataclass
class ModelSection:
    """path: HF folder, .gguf file, hub id, or "demo" (the project's SmolLM2-135M-Instruct)."""

    path: str = "demo"
    dtype: str = "float32"  # weights and compute dtype of the non-quantized parts
    quant: QuantMode = QuantMode.NONE
    double_quant: bool = True
    compute_dtype: str = "bfloat16"  # 4-bit matmul dtype
    quant_storage: str = "uint8"  # "bfloat16" to shard a 4-bit base with FSDP
    gradient_checkpointing: bool = False
    autocast: bool = False  # bf16 autocast on GPU; fp32 master weights

    def quant_config(self) -> QuantConfig | None:
        if self.quant == QuantMode.NONE:
            return None
        compute = self.compute_dtype if torch.cuda.is_available() or self.compute_dtype != "bfloat16" else "float32"
        return QuantConfig(quant_type=QuantType(self.quant.value), double_quant=self.double_quant,
                           compute_dtype=compute, quant_storage=self.quant_storage)

    @property
    def torch_dtype(self) -> torch.dtype:
        return as_dtype(self.dtype)


@dataclass
class LoRASection:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("all-linear",)
    rslora: bool = False
    init: LoRAInit = LoRAInit.KAIMING

    def __post_init__(self):
        self.lora_config()  # LoRAConfig checks r, alpha and dropout: fail at config time, not at apply_lora

    def lora_config(self) -> LoRAConfig:
        targets = "all-linear" if tuple(self.target_modules) == ("all-linear",) else tuple(self.target_modules)
        return LoRAConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, target_modules=targets,
                          rslora=self.rslora, init=self.init)


@dataclass
class OptimSection:
    name: Optimizer = Optimizer.ADAMW
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Schedule = Schedule.COSINE
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self):
        require(0 <= self.lr < float("inf"), "lr", self.lr, "must be >= 0 and finite; use a learning rate such as 1e-4")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", list(self.betas),
                "must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        require(self.eps > 0, "eps", self.eps, "must be > 0, e.g. 1e-8")
        require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        require(self.grad_clip > 0, "grad_clip", self.grad_clip, "must be > 0 (a very large value disables clipping)")


@dataclass
class RunSection:
    output_dir: str = "outputs/run"
    max_steps: int = 0  # 0: derived from epochs
    epochs: float = 1.0
    batch_size: int = 4  # micro-batch per rank
    grad_accum: int = 1
    global_batch: int = 0  # 0: batch_size * grad_accum * world; else grad_accum is derived from it
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    resume: str = "false"  # "false", "true" (latest in output_dir) or a checkpoint path
    overwrite: bool = False
    device: str = "auto"
    parallel: Parallel = Parallel.NONE
    memory_check: bool = True  # refuse a run predicted not to fit
    progress: bool = True

    def __post_init__(self):
        for name in ("max_steps", "global_batch", "eval_every", "save_every"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0 (0 turns it off)")
        for name in ("batch_size", "grad_accum", "log_every", "keep_last"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.epochs > 0, "epochs", self.epochs, "must be > 0 (or set run.max_steps)")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class WandbSection:
    enabled: bool = False
    project: str = "minitune"
    name: str = ""
    mode: str = "offline"  # offline works with no account or network; WANDB_MODE overrides


@dataclass
class DataSection:
    """source: "synthetic" (the project's task), or a file/folder/hub dataset."""

    source: str = "synthetic"
    template: Template = Template.CHAT
    text_column: str = "text"
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    hh_format: bool = False
    seq_length: int = 256
    completion_only: bool = True
    holdout: float = 0.05  # fraction (< 1) or count of rows held out for eval
    max_rows: int = 0  # 0: all
    shuffle_buffer: int = 16
    synthetic_train: int = 2000
    synthetic_eval: int = 100

    def __post_init__(self):
        require(self.seq_length >= 2, "seq_length", self.seq_length, "must be >= 2 tokens")
        require(self.holdout > 0, "holdout", self.holdout, "must be > 0: a fraction below 1 or a row count")
        for name in ("max_rows", "shuffle_buffer"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        for name in ("synthetic_train", "synthetic_eval"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")


def resolve_grad_accum(run: RunSection, world_size: int) -> int:
    """Micro-steps per optimizer step; raises when run.global_batch does not divide evenly."""
    if not run.global_batch:
        return run.grad_accum
    per_step = run.batch_size * world_size
    if run.global_batch % per_step:
        raise MinituneError(
            f"run.global_batch={run.global_batch} is not divisible by run.batch_size ({run.batch_size}) x world size "
            f"({world_size}) = {per_step}; pick a global batch that is a multiple of {per_step}"
        )
    return run.global_batch // per_step
