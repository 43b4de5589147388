"""A model and a trainable head on its hidden states as one module.

DDP and FSDP2 wrap a module and synchronize (or shard) the parameters its forward uses. A reward or
value head applied to the model's output outside that forward is invisible to them, so its gradient
would have to be all-reduced by hand. `WithHead` puts the head inside: the recipes wrap `WithHead`,
and the head's parameters are averaged, sharded and checkpointed like the adapter's.

Called without `head_on`, `WithHead` is the plain model (generation, reference and reward passes go
through it unchanged); with `head_on`, a function picking the head's input from the hidden states
[B, S, H], it returns `(model output, head output)`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from minitune.model import ModelOutput, Transformer


class WithHead(nn.Module):
    def __init__(self, model: Transformer, head: nn.Module):
        super().__init__()
        self.model = model
        self.head = head

    @property
    def config(self):
        return self.model.config

    def forward(self, *args, head_on: Callable[[torch.Tensor], torch.Tensor] | None = None, **kwargs):
        out: ModelOutput = self.model(*args, **kwargs)
        return out if head_on is None else (out, self.head(head_on(out.hidden)))

    # generation drives the model's KV cache through the wrapper
    def setup_cache(self, *args, **kwargs):
        return self.model.setup_cache(*args, **kwargs)

    def repeat_cache(self, n: int):
        return self.model.repeat_cache(n)

    def select_cache(self, rows):
        return self.model.select_cache(rows)

    def clear_cache(self):
        return self.model.clear_cache()


def base_model(model: nn.Module) -> Transformer:
    """The Transformer inside any wrapping: DDP, then `WithHead` (FSDP2 shards in place)."""
    m = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return m.model if isinstance(m, WithHead) else m
