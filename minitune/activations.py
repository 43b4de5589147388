"""Activation checkpointing (optionally with the kept layer inputs offloaded to CPU) as a transform
on a built model."""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: nn.Module, *, offload: bool = False) -> nn.Module:
    """Recomputes each decoder layer in the backward pass instead of storing its activations.

    Non-reentrant checkpointing: gradients reach LoRA weights even though the frozen embedding's
    output does not require grad (reentrant checkpointing returns None there, peft #1142) and DDP
    does not see parameters "marked ready twice" (trl #921). The layer's forward is wrapped in
    place, so parameter names (and with them PEFT keys and checkpoints) do not change.

    offload: what checkpointing still keeps is one hidden state per layer, [B, T, D] each, the part
    that grows with T. With offload=True that input is copied to (pinned) CPU memory as the layer
    runs and copied back when the layer is recomputed, so accelerator memory no longer grows with
    the number of layers (see `ToHost`).
    """
    for layer in model.model.layers:
        if getattr(layer, "_checkpointed", False):
            continue
        inner = layer.forward
        layer.forward = functools.partial(_offloaded if offload else _checkpointed, inner)
        layer._checkpointed = True
    return model


def _checkpointed(fn, *args, **kwargs):
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def _offloaded(fn, x, *args, **kwargs):
    if not torch.is_grad_enabled():
        return fn(x, *args, **kwargs)
    device = x.device
    host = ToHost.apply(x)
    first = [x]  # the forward itself uses the device tensor; only the recompute uploads the copy

    def run(h, *a, **kw):
        return fn(first.pop() if first else _upload(h, device), *a, **kw)

    # The checkpoint keeps its inputs for the recompute: it gets the host copy, so after this layer
    # nothing holds the device tensor.
    return checkpoint(run, host, *args, use_reentrant=False, **kwargs)


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        torch.cuda.current_stream(device).wait_stream(_side_stream(device))  # the offload copy is done
    return host.to(device, non_blocking=True)


class ToHost(torch.autograd.Function):
    """Identity whose output lives in host memory: pinned when the input is on an accelerator, with
    the copy on a side stream so that it overlaps the layer's compute."""

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        ctx.device = x.device
        if x.device.type == "cpu":
            return x.clone()  # nothing to offload to; a copy keeps the code path the same (and tested)
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        stream = _side_stream(x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            host.copy_(x, non_blocking=True)
        x.record_stream(stream)  # the allocator must not reuse x's memory before the copy finished
        return host

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.device, non_blocking=True)


@functools.cache
def _side_stream(device: torch.device):
    return torch.cuda.Stream(device)
