"""Regional compilation: `torch.compile` of each decoder layer, as a transform on a built model.

Compiling the repeated block instead of the whole model (as torchtune and torchtitan do) keeps the
compile time to about one layer's (the layers share one compiled graph) and composes with what
wraps the layers: LoRA and 4-bit linears inside them, activation checkpointing and CPU offloading
around them (applied after this; tested), DDP and FSDP2 around the model (`finish_model` applies
it first; not yet tested under torchrun).

Only forwards that build a graph for backward run compiled. Evaluation and generation (no grad)
take the eager layer, so their varying prompt and cache shapes cause no recompilation; the decode
step has its own compiled path (`generate(compile=True)`).
"""
from __future__ import annotations

import functools

import torch
from torch import nn


def compile_layers(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Replaces each decoder layer's forward with a compiled one (parameter names do not change).
    compile_kwargs go to torch.compile (e.g. mode="max-autotune")."""
    for layer in model.model.layers:
        if getattr(layer, "_compiled", False):
            continue
        if getattr(layer, "_checkpointed", False):
            raise ValueError("compile_layers must come before apply_activation_checkpointing")
        eager = layer.forward
        layer.forward = functools.partial(_training_compiled, eager, torch.compile(eager, **compile_kwargs))
        layer._compiled = True
    return model


def _training_compiled(eager, compiled, *args, **kwargs):
    return compiled(*args, **kwargs) if torch.is_grad_enabled() else eager(*args, **kwargs)
