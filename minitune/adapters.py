"""Adapter files in PEFT's format, both ways.

A folder holds `adapter_config.json` (peft_type LORA, r, lora_alpha, lora_dropout, target_modules,
use_rslora, bias "none", task_type, base_model_name_or_path) and `adapter_model.safetensors` with
keys `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (adapter name stripped, as
PEFT saves them). Because minitune's parameter names equal Hugging Face's, `<module path>` is the
same in both libraries. Extra tensors (a reward head saved as `base_model.model.score.weight`, which
PEFT treats as a module to save) ride along in the same file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from minitune.checkpoint import atomic_save_safetensors, atomic_write_text, iter_safetensors
from minitune.errors import MinituneError
from minitune.lora import LoRAConfig, LoRALinear, _is_linear, lora_layers

PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
METADATA_NAME = "minitune.json"  # how the adapter was trained (prompt rendering); not read by PEFT


def adapter_state_dict(model: nn.Module, name: str, materialize=lambda t: t) -> dict[str, torch.Tensor]:
    """PEFT-named A/B tensors of adapter `name` (the one writer of adapter state). `materialize`
    turns a sharded parameter into the full tensor (FSDP: `minitune.distributed.full_tensor`)."""
    sd = {}
    for path, layer in lora_layers(model):
        if name in layer.adapters:
            a = layer.adapters[name]
            sd[f"{PREFIX}{path}.lora_A.weight"] = materialize(a.lora_A.detach()).cpu().contiguous()
            sd[f"{PREFIX}{path}.lora_B.weight"] = materialize(a.lora_B.detach()).cpu().contiguous()
    return sd


def split_adapter_tensors(tensors: dict[str, torch.Tensor], source) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """(LoRA tensors by module path {"A": ..., "B": ...}, extra tensors such as a head) from PEFT
    keys, prefixes stripped: the one reader of adapter state (loading and resuming)."""
    lora, extra = {}, {}
    for key, t in tensors.items():
        k = key.removeprefix(PREFIX)
        if ".lora_A." in k or ".lora_B." in k:
            path, _, rest = k.partition(".lora_")
            lora.setdefault(path, {})[rest[0]] = t  # "A" or "B"
        elif "lora_embedding" in k or "lora_magnitude" in k:
            raise MinituneError(f"{source}: {key} is not supported (embedding LoRA / DoRA)")
        else:
            extra[k] = t
    return lora, extra


def save_adapter(
    model: nn.Module,
    folder: str | os.PathLike,
    name: str = "default",
    *,
    base_model_name_or_path: str = "",
    extra_tensors: dict[str, torch.Tensor] | None = None,
    task_type: str = "CAUSAL_LM",
    modules_to_save: list[str] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    metadata: dict | None = None,
) -> Path:
    """Writes adapter `name` in PEFT format (atomically). `extra_tensors` are saved under
    `base_model.model.<key>`; unless `modules_to_save` says otherwise, the modules they belong to
    (`score` for "score.weight") are listed as PEFT's modules_to_save. `state_dict` may pass
    already-gathered tensors (sharded training). `metadata` (how the adapter was trained, e.g. its
    prompt rendering) goes to minitune.json beside the PEFT files, which PEFT ignores. Raises if the
    adapter would be empty or has an empty tensor (peft #286)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    sd = dict(state_dict) if state_dict is not None else adapter_state_dict(model, name)
    cfg = next((layer.adapters[name].cfg for _, layer in lora_layers(model) if name in layer.adapters), None)
    if cfg is None or not sd:
        raise MinituneError(f"no adapter named {name!r} to save")
    for k, v in (extra_tensors or {}).items():
        sd[PREFIX + k] = v.detach().cpu().contiguous()
    empty = [k for k, v in sd.items() if v.numel() == 0]
    if empty:
        raise MinituneError(f"refusing to save empty adapter tensors: {empty[:4]}")
    if modules_to_save is None and extra_tensors:
        modules_to_save = sorted({k.split(".")[0] for k in extra_tensors})
    targets = sorted({path.rpartition(".")[2] for path, layer in lora_layers(model) if name in layer.adapters})
    config = {
        "peft_type": "LORA", "task_type": task_type, "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": targets, "use_rslora": cfg.rslora, "bias": "none",
        "base_model_name_or_path": base_model_name_or_path, "init_lora_weights": True, "fan_in_fan_out": False,
        "use_dora": False, "inference_mode": True, "modules_to_save": modules_to_save,
    }
    atomic_save_safetensors(sd, out / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2))
    if metadata:
        atomic_write_text(out / METADATA_NAME, json.dumps(metadata, indent=2))
    return out


def read_adapter_metadata(folder: str | os.PathLike) -> dict:
    """What `save_adapter(metadata=...)` recorded; {} for adapters saved without it (or by PEFT)."""
    path = Path(folder) / METADATA_NAME
    return json.loads(path.read_text()) if path.exists() else {}


def read_adapter_config(folder: Path) -> LoRAConfig:
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.exists():
        raise MinituneError(f"{folder}: no {CONFIG_NAME} (not a PEFT adapter folder)")
    raw = json.loads(cfg_path.read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise MinituneError(f"{cfg_path}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
    if raw.get("use_dora"):
        raise MinituneError(f"{cfg_path}: DoRA adapters are not supported")
    if raw.get("bias", "none") != "none":
        raise MinituneError(f"{cfg_path}: bias={raw['bias']!r} is not supported (only 'none')")
    targets = raw.get("target_modules") or ()
    return LoRAConfig(r=int(raw["r"]), alpha=float(raw.get("lora_alpha", 8)), dropout=float(raw.get("lora_dropout", 0.0)),
                      target_modules=targets if isinstance(targets, str) else tuple(targets),
                      rslora=bool(raw.get("use_rslora", False)))


def load_adapter(
    model: nn.Module, folder: str | os.PathLike, name: str = "default", *, trainable: bool = False
) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """Loads a PEFT LoRA adapter folder into `model` as adapter `name` (made active).

    Returns (config, extra tensors such as `score.weight` with the PEFT prefix stripped). Raises
    MinituneError when the adapter names modules this base lacks, or its shapes/rank do not fit.
    """
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.exists():
        raise MinituneError(f"{folder}: no {WEIGHTS_NAME}")
    lora, extra = split_adapter_tensors(dict(iter_safetensors(weights)), weights)
    if not lora:
        raise MinituneError(f"{weights}: no LoRA tensors")
    modules = dict(model.named_modules())
    for path, ab in lora.items():
        if path not in modules:
            raise MinituneError(
                f"adapter targets {path}, which this base model does not have (adapter for another architecture?)"
            )
        layer = modules[path]
        if not isinstance(layer, LoRALinear):
            if not _is_linear(layer):
                raise MinituneError(f"adapter targets {path}, which is a {type(layer).__name__}, not a linear")
            parent_path, _, leaf = path.rpartition(".")
            layer = LoRALinear(layer)
            setattr(modules[parent_path] if parent_path else model, leaf, layer)
        A, B = ab.get("A"), ab.get("B")
        if A is None or B is None:
            raise MinituneError(f"{weights}: {path} has only one of lora_A / lora_B")
        expect_a, expect_b = (cfg.r, layer.in_features), (layer.out_features, cfg.r)
        if tuple(A.shape) != expect_a or tuple(B.shape) != expect_b:
            raise MinituneError(
                f"{path}: adapter shapes A{tuple(A.shape)} B{tuple(B.shape)} do not fit this base, which needs "
                f"A{expect_a} B{expect_b} for r={cfg.r} (adapter for another architecture or rank?)"
            )
        adapter = layer.add_adapter(name, cfg)
        with torch.no_grad():
            adapter.lora_A.copy_(A)
            adapter.lora_B.copy_(B)
        adapter.requires_grad_(trainable)
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            layer.active = name
    return cfg, extra
