"""Activation checkpointing as a transform on a built model."""
from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recomputes each decoder layer in the backward pass instead of storing its activations.

    Non-reentrant checkpointing: gradients reach LoRA weights even though the frozen embedding's
    output does not require grad (reentrant checkpointing returns None there, peft #1142) and DDP
    does not see parameters "marked ready twice" (trl #921). The layer's forward is wrapped in
    place, so parameter names (and with them PEFT keys and checkpoints) do not change.
    """
    for layer in model.model.layers:
        if getattr(layer, "_checkpointed", False):
            continue
        inner = layer.forward
        layer.forward = functools.partial(_checkpointed, inner)
        layer._checkpointed = True
    return model


def _checkpointed(fn, *args, **kwargs):
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)
