"""The optimizer and the learning-rate schedule of a recipe's OptimSection."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from minitune.errors import MinituneError
from minitune.train.sections import OptimSection, Optimizer, Schedule


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimSection) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise MinituneError("no trainable parameters (did apply_lora run?)")
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == Optimizer.ADAMW:
        return torch.optim.AdamW(params, **kw)
    import bitsandbytes as bnb

    cls = {Optimizer.ADAMW_8BIT: bnb.optim.AdamW8bit, Optimizer.PAGED_ADAMW: bnb.optim.PagedAdamW,
           Optimizer.PAGED_ADAMW_8BIT: bnb.optim.PagedAdamW8bit}[cfg.name]
    return cls(params, **kw)


def lr_lambda(cfg: OptimSection, total_steps: int):
    """Multiplier of the base lr at optimizer step s: linear warmup, then cosine/linear/constant."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(cfg.warmup_steps, 1)
        if cfg.schedule == Schedule.CONSTANT:
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == Schedule.COSINE else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay
    return f
