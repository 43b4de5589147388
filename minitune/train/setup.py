"""Set-up steps shared by the SFT, reward and PPO recipes: plain functions, called in order."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from minitune.activations import apply_activation_checkpointing
from minitune.adapters import PREFIX, adapter_state_dict, save_adapter
from minitune.checkpoint import iter_safetensors, load_model
from minitune.distributed import DistInfo, apply_ddp, apply_fsdp, barrier, full_tensor, unwrap
from minitune.errors import MinituneError
from minitune.lora import LoRALinear, lora_layers
from minitune.model import Transformer
from minitune.quant import as_dtype, prepare_for_kbit_training
from minitune.train.checkpointing import (CheckpointManager, load_optimizer_state, load_pt, local_optimizer_state,
                                          resolve_resume, resume_path, save_pt)
from minitune.train.config import dump_config
from minitune.train.sections import ModelSection, Parallel, RunSection
from minitune.train.utils import rng_state, set_rng_state


def model_path(path: str) -> Path:
    """"demo" is the project's SmolLM2-135M-Instruct (fetched and cached on first use)."""
    if path == "demo":
        from minitune.demo_model import demo_model_path

        return demo_model_path()
    p = Path(path).expanduser()
    if not p.exists() and not (path.count("/") == 1 and not path.startswith((".", "/", "~"))):
        raise MinituneError(f"model.path {path!r} does not exist")
    return p


def prepare_output(cfg, run: RunSection, info: DistInfo) -> tuple[Path, Path | None]:
    """Creates the output folder, finds the checkpoint to resume from (refusing a folder with another
    run's checkpoints), prints and saves the resolved config. Returns (out_dir, resume_path)."""
    out = Path(run.output_dir)
    resume = resolve_resume(out, run.resume, run.overwrite) if info.is_main else None
    barrier()
    if not info.is_main:
        resume = resume_path(out, run.resume)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
        print(describe_run(cfg, resume), flush=True)
    return out, resume


def describe_run(cfg, resume: Path | None = None) -> str:
    """The first screen of a run: model, quantization, LoRA, data, steps and output folder in a few
    lines (the full resolved config is in <output_dir>/config.yaml)."""
    m, lora, d, r, o = (getattr(cfg, k, None) for k in ("model", "lora", "data", "run", "optim"))
    lines = []
    if m is not None:
        extras = [m.dtype] + ([f"{m.quant.value} base"] if m.quant_config() is not None else [])
        extras += ["gradient checkpointing"] if m.gradient_checkpointing else []
        lines.append(f"model   {m.path} ({', '.join(extras)})")
    if lora is not None:
        lines.append(f"lora    r={lora.r} alpha={lora.alpha:g} dropout={lora.dropout:g} on {', '.join(lora.target_modules)}")
    if d is not None:
        lines.append(f"data    {d.source}, sequences of {d.seq_length} tokens")
    if r is not None:
        steps = f"{r.max_steps} steps" if r.max_steps else f"{r.epochs:g} epoch(s)"
        lr = f", lr {o.lr:g}" if o is not None else ""
        lines.append(f"run     {steps}, batch {r.batch_size} x {r.grad_accum} accumulation per rank{lr}, seed {r.seed}"
                     + (f", resuming from {resume}" if resume else ""))
        lines.append(f"output  {r.output_dir} (full config: config.yaml, metrics: metrics.jsonl)")
    return "\n".join(lines)


def build_base(m: ModelSection, device: torch.device) -> Transformer:
    """Loads the base (quantizing while reading when configured) and freezes it."""
    path = model_path(m.path)
    model = load_model(path, dtype=m.torch_dtype, device=device, quant=m.quant_config())
    if m.quant_config() is not None:
        prepare_for_kbit_training(model, norm_dtype=m.torch_dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def finish_model(model: Transformer, m: ModelSection, run: RunSection, info: DistInfo) -> nn.Module:
    """Gradient checkpointing, then DDP or FSDP2. Returns the module to call in the training step."""
    if m.gradient_checkpointing:
        apply_activation_checkpointing(model)
    if run.parallel == Parallel.DDP and info.world_size > 1:
        return apply_ddp(model, info)
    if run.parallel == Parallel.FSDP and info.world_size > 1:
        storage = m.quant_storage if m.quant_config() is not None else None
        if storage is not None and as_dtype(storage) != m.torch_dtype:
            raise MinituneError(
                f"FSDP with a 4-bit base needs model.quant_storage ({storage}) equal to model.dtype ({m.dtype}), "
                "or FSDP casts and corrupts the packed weights"
            )
        return apply_fsdp(model, info)
    return model


def progress_bar(total: int, initial: int, info: DistInfo, run: RunSection, desc: str):
    return tqdm(total=total, initial=initial, desc=desc, disable=not (info.is_main and run.progress), dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# checkpoints


def gathered_adapter(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """PEFT-named adapter tensors, gathered from FSDP shards (every rank must call this)."""
    sd = {}
    for path, layer in lora_layers(unwrap(model)):  # DDP would prefix every name with "module."
        if name in layer.adapters:
            a = layer.adapters[name]
            sd[f"{PREFIX}{path}.lora_A.weight"] = full_tensor(a.lora_A.detach()).cpu().contiguous()
            sd[f"{PREFIX}{path}.lora_B.weight"] = full_tensor(a.lora_B.detach()).cpu().contiguous()
    return sd


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or inf."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def save_state(
    mgr: CheckpointManager, step: int, model: nn.Module, *, adapter: str, optimizer, scheduler, data_state: dict,
    info: DistInfo, extras: dict | None = None, head_tensors: dict[str, torch.Tensor] | None = None,
    base_name: str = "", task_type: str = "CAUSAL_LM",
) -> Path:
    """Writes a full training checkpoint atomically (see minitune.train.checkpointing).

    Refuses weights with a NaN/inf: a checkpoint on disk is always one a run can resume from, so the
    newest one is the last good one."""
    sd = gathered_adapter(model, adapter)
    heads = {k: full_tensor(v.detach()).cpu() for k, v in (head_tensors or {}).items()}
    bad = non_finite({**sd, **heads})
    if bad:
        latest = mgr.latest()
        raise MinituneError(f"not saving step {step}: {len(bad)} adapter tensor(s) hold NaN/inf (first: {bad[0]}); "
                            f"the last good checkpoint is {latest if latest else 'none (none was saved)'}")

    def write(tmp: Path):
        if info.is_main:
            save_adapter(model, tmp / "adapter", adapter, state_dict=sd, extra_tensors=heads,
                         base_model_name_or_path=base_name, task_type=task_type,
                         modules_to_save=sorted({k.split(".")[0] for k in heads}) or None)
            save_pt({"step": step, "scheduler": scheduler.state_dict() if scheduler else None,
                     "extras": extras or {}}, tmp / "common.pt")
        save_pt({"optimizer": local_optimizer_state(optimizer), "data": data_state, "rng": rng_state()},
                tmp / f"rank{info.rank}.pt")

    return mgr.save(step, write, rank=info.rank, barrier=barrier)


def restore_adapter(model: nn.Module, ckpt: Path, adapter: str) -> dict[str, torch.Tensor]:
    """Copies the checkpoint's adapter into the (unsharded) model's adapter `adapter`; returns the
    extra (head) tensors with the PEFT prefix stripped."""
    tensors = dict(iter_safetensors(ckpt / "adapter" / "adapter_model.safetensors"))
    bad = non_finite(tensors)
    if bad:
        raise MinituneError(f"{ckpt} holds NaN/inf weights ({bad[0]}): resuming would give NaN at once; "
                            "resume from an earlier checkpoint (run.resume=<path>)")
    layers = dict(lora_layers(model))
    extra = {}
    with torch.no_grad():
        for key, t in tensors.items():
            k = key.removeprefix(PREFIX)
            if ".lora_A." in k or ".lora_B." in k:
                path, _, rest = k.partition(".lora_")
                layer: LoRALinear = layers[path]
                getattr(layer.adapters[adapter], "lora_" + rest[0]).copy_(t)
            else:
                extra[k] = t
    return extra


def restore_state(ckpt: Path, optimizer, scheduler, info: DistInfo) -> tuple[int, dict, dict]:
    """Loads optimizer, scheduler and RNG; returns (step, data_state, extras)."""
    common = load_pt(ckpt / "common.pt")
    mine = load_pt(ckpt / f"rank{info.rank}.pt")
    load_optimizer_state(optimizer, mine["optimizer"])
    if scheduler is not None and common["scheduler"] is not None:
        scheduler.load_state_dict(common["scheduler"])
    set_rng_state(mine["rng"])
    return int(common["step"]), mine["data"], common.get("extras", {})


__all__ = ["adapter_state_dict", "build_base", "finish_model", "gathered_adapter", "model_path", "prepare_output",
           "progress_bar", "restore_adapter", "restore_state", "save_state"]
