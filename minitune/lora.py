"""LoRA written by hand: one `LoRALinear` that wraps any base linear (nn.Linear, minitune/bitsandbytes
4-bit, bitsandbytes 8-bit) and holds any number of named adapters, one active at a time.

    y = base(x) + scale * B(A(dropout(x))),   scale = alpha / r   (rsLoRA: alpha / sqrt(r))

Several adapters on one frozen base is what PPO needs: the policy adapter, the reward adapter and
the reference model (all adapters disabled) share one copy of the base weights.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from enum import Enum
from typing import Iterator

import torch
from torch import nn

from minitune.dtypes import as_dtype
from minitune.errors import MinituneError
from minitune.quant import dequantize_weight, is_quantized_linear

ALL_LINEAR = "all-linear"
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAInit(str, Enum):
    KAIMING = "kaiming"  # A ~ kaiming-uniform(a=sqrt(5)), B = 0 (PEFT's default)
    GAUSSIAN = "gaussian"  # A ~ N(0, 1/r), B = 0


@dataclass
class LoRAConfig:
    """r: rank. alpha: scale numerator. dropout: on the adapter's input. target_modules: leaf names
    of linears to wrap, or "all-linear" (every linear but lm_head). rslora: scale alpha/sqrt(r).
    adapter_dtype: dtype of A and B (kept in fp32 by default; compute follows the input's dtype)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ALL_LINEAR
    rslora: bool = False
    init: LoRAInit = LoRAInit.KAIMING
    adapter_dtype: str = "float32"

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise MinituneError(f"lora.r must be a positive integer, got {self.r!r}")
        if self.alpha <= 0:
            raise MinituneError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise MinituneError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, list):
            self.target_modules = tuple(self.target_modules)
        if self.target_modules == (ALL_LINEAR,):  # a config list [all-linear]
            self.target_modules = ALL_LINEAR
        self.init = LoRAInit(self.init)
        as_dtype(self.adapter_dtype)

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


class LoRAAdapter(nn.Module):
    """One low-rank update: A [r, in], B [out, r]."""

    def __init__(self, in_features: int, out_features: int, cfg: LoRAConfig, device=None):
        super().__init__()
        dtype = as_dtype(cfg.adapter_dtype)
        self.cfg = cfg
        self.scale = cfg.scale
        self.lora_A = nn.Parameter(torch.empty(cfg.r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, cfg.r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self):
        if self.cfg.init == LoRAInit.KAIMING:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1.0 / self.cfg.r)
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A as [out, in] in the adapter dtype."""
        return self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Compute in the input's dtype; the fp32 master weights receive the gradients through the cast.
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return (self.dropout(x) @ a.t() @ b.t()) * self.scale

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y + forward(x). Without dropout and with y in x's dtype, the B product accumulates into y
        inside one GEMM (addmm: no [.., out] temporary for the update, its scale and its sum)."""
        if not isinstance(self.dropout, nn.Identity) or y.dtype != x.dtype:
            return y + self.forward(x).to(y.dtype)
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        xa = x.reshape(-1, x.shape[-1]) @ a.t()
        return torch.addmm(y.reshape(-1, y.shape[-1]), xa, b.t(), alpha=self.scale).view(y.shape)


class LoRALinear(nn.Module):
    """A base linear plus named LoRA adapters. `base_layer` keeps the base's parameter names."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.merged: str | None = None

    def add_adapter(self, name: str, cfg: LoRAConfig) -> LoRAAdapter:
        if name in self.adapters:
            raise MinituneError(f"adapter {name!r} already exists on this layer")
        device = next((p.device for p in self.base_layer.parameters() if p.device.type != "meta"), None)
        self.adapters[name] = LoRAAdapter(self.in_features, self.out_features, cfg, device=device)
        return self.adapters[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged is not None:
            if self.disabled or self.active != self.merged:
                raise MinituneError(f"adapter {self.merged!r} is merged into the base; unmerge it first")
            return y
        if self.disabled or self.active is None or self.active not in self.adapters:
            return y
        return self.adapters[self.active].add_to(y, x)

    # -- merging ------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W += scale * B @ A in place (full-precision base only)."""
        if is_quantized_linear(self.base_layer):
            raise MinituneError(
                "cannot merge in place into a quantized base: use merge_for_export(), which merges into a "
                "dequantized full-precision copy"
            )
        if self.merged is not None:
            raise MinituneError(f"adapter {self.merged!r} is already merged")
        w = self.base_layer.weight
        w.add_(self.adapters[name].delta_weight().to(w.dtype))
        self.merged, self.active = name, name

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is None:
            return
        w = self.base_layer.weight
        w.sub_(self.adapters[self.merged].delta_weight().to(w.dtype))
        self.merged = None

    @torch.no_grad()
    def merged_linear(self, name: str, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A new nn.Linear holding dequant(W) + scale * B @ A (for export from any base)."""
        if self.merged is not None:
            raise MinituneError("unmerge before exporting")
        w = dequantize_weight(self.base_layer).float() + self.adapters[name].delta_weight().float()
        bias = getattr(self.base_layer, "bias", None)
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=dtype)
        out.weight.copy_(w)
        if bias is not None:
            out.bias.copy_(bias.float())
        return out


# ----------------------------------------------------------------------------------------------
# model-level transforms


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_quantized_linear(m)


def linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the linears LoRA can target (lm_head excluded)."""
    names = set()
    for name, m in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf == "lm_head" or not name:
            continue
        if isinstance(m, LoRALinear) or (_is_linear(m) and not name.endswith(".base_layer")):
            names.add(leaf)
    return sorted(names)


def apply_lora(model: nn.Module, cfg: LoRAConfig, name: str = "default", *, trainable: bool = True) -> dict:
    """Adds adapter `name` to the target linears (wrapping them in LoRALinear once), makes it active,
    freezes every other parameter and returns {"trainable", "total", "percent"} parameter counts.

    Raises MinituneError for unknown target names (listing the available ones).
    """
    available = linear_names(model)
    targets = set(available) if cfg.target_modules == ALL_LINEAR else set(
        (cfg.target_modules,) if isinstance(cfg.target_modules, str) else cfg.target_modules)
    unknown = sorted(targets - set(available))
    if unknown:
        raise MinituneError(f"lora.target_modules {unknown} not found; available linear names: {available} or 'all-linear'")
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name not in targets:
                continue
            if isinstance(child, LoRALinear):
                child.add_adapter(name, cfg)
            elif _is_linear(child) and not isinstance(parent, LoRALinear):
                wrapped = LoRALinear(child)
                wrapped.add_adapter(name, cfg)
                setattr(parent, child_name, wrapped)
    set_adapter(model, name)
    for p in model.parameters():
        p.requires_grad_(False)
    if trainable:
        for p in lora_parameters(model, name):
            p.requires_grad_(True)
    from minitune.model import count_params

    return count_params(model)


def lora_parameters(model: nn.Module, name: str | None = None) -> Iterator[nn.Parameter]:
    """The A and B parameters of adapter `name` (every adapter when None), selected by module type."""
    for _, layer in lora_layers(model):
        for adapter_name, adapter in layer.adapters.items():
            if name is None or adapter_name == name:
                yield adapter.lora_A
                yield adapter.lora_B


def adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, layer in lora_layers(model):
        names += [n for n in layer.adapters if n not in names]
    return names


def set_adapter(model: nn.Module, name: str) -> None:
    """Makes adapter `name` the active one on every LoRA layer."""
    if name not in adapter_names(model):
        raise MinituneError(f"no adapter named {name!r}; the model has {adapter_names(model)}")
    for _, layer in lora_layers(model):
        layer.active = name


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model is the bare base (the PPO reference model)."""
    layers = [layer for _, layer in lora_layers(model)]
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str):
    """Within the block adapter `name` is active; the previous one is restored after."""
    layers = [layer for _, layer in lora_layers(model)]
    previous = [layer.active for layer in layers]
    set_adapter(model, name)
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.active = was


def merge_adapter(model: nn.Module, name: str | None = None) -> None:
    """Merges adapter `name` (default: the active one) into full-precision base weights in place."""
    for _, layer in lora_layers(model):
        layer.merge(name or layer.active)


def unmerge_adapter(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


@torch.no_grad()
def merge_for_export(model: nn.Module, name: str | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replaces every LoRALinear by a plain nn.Linear with the adapter merged, and every remaining
    quantized linear by its dequantized nn.Linear, in place; returns the model in `dtype`.

    With a 4-bit/8-bit base the merged weight is dequant(W_q) + scale * B @ A: the adapter was
    trained against the dequantized weights, so this reproduces the trained model up to float
    rounding. Requantizing that result would add a second quantization error (peft #2321).
    """
    name = name or next(iter(adapter_names(model)), None)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                if child.merged is not None:
                    child.unmerge()
                setattr(parent, child_name, child.merged_linear(name, dtype))
            elif is_quantized_linear(child):
                w = dequantize_weight(child)
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device=w.device)
                lin.weight.copy_(w)
                if child.bias is not None:
                    lin.bias.copy_(child.bias.float())
                setattr(parent, child_name, lin)
    model.to(dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def base_parameter_bytes(model: nn.Module) -> int:
    """Bytes of distinct parameter storages outside LoRA adapters: the frozen base a run holds.
    PPO's policy, reference and reward adapters must not change it."""
    adapter_params = {id(p) for m in model.modules() if isinstance(m, LoRAAdapter) for p in m.parameters()}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in adapter_params:
            continue
        key = p.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += p.untyped_storage().nbytes()
    return total
