"""Set-up steps shared by the recipes: plain functions, called in order."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from minitune.activations import apply_activation_checkpointing
from minitune.attention import set_attention
from minitune.compile import compile_layers
from minitune.cpu_linear import pack_linears
from minitune.adapters import adapter_state_dict, load_adapter, save_adapter, split_adapter_tensors
from minitune.checkpoint import iter_safetensors, load_model
from minitune.distributed import (DistInfo, apply_ddp, apply_fsdp, barrier, check_parallel, cleanup, full_tensor,
                                  init_distributed)
from minitune.dtypes import as_dtype
from minitune.errors import MinituneError
from minitune.heads import WithHead, base_model
from minitune.lora import (LoRAConfig, apply_lora, disable_adapters, lora_layers, lora_parameters, set_adapter,
                           use_adapter)
from minitune.memory import MemoryPlan, check_fits
from minitune.model import Transformer
from minitune.quant import prepare_for_kbit_training
from minitune.tokenizer import Tokenizer, load_tokenizer
from minitune.train.checkpointing import (CheckpointManager, load_optimizer_state, load_pt, local_optimizer_state,
                                          resolve_resume, resume_path, save_pt)
from minitune.train.config import dump_config, to_dict
from minitune.train.metrics import MetricsLogger
from minitune.train.sections import (SFT_OUTPUT_DIR, ModelSection, OptimSection, Optimizer, Parallel, RunSection,
                                     resolve_grad_accum)
from minitune.train.rng import rng_state, set_rng_state


def model_path(path: str) -> Path:
    """"demo" is the project's SmolLM2-135M-Instruct (fetched and cached on first use)."""
    if path == "demo":
        from minitune.demo_model import demo_model_path

        return demo_model_path()
    p = Path(path).expanduser()
    if not p.exists() and not (path.count("/") == 1 and not path.startswith((".", "/", "~"))):
        raise MinituneError(f"model.path {path!r} does not exist")
    return p


class RunContext(NamedTuple):
    """What every recipe holds after `start_run`: the process (rank, world, device), the output
    folder and the checkpoint to resume from, the tokenizer, the metrics logger, and the gradient
    accumulation steps that make up run.global_batch."""

    info: DistInfo
    device: torch.device
    out_dir: Path
    resume: Path | None
    tok: Tokenizer
    log: MetricsLogger
    grad_accum: int


def start_run(cfg) -> RunContext:
    """The set-up every recipe begins with, in order: process group on the configured device; the
    batch arithmetic and the model path checked before anything is written; output folder, resume
    point and the resolved config (printed and saved); tokenizer; metrics logger."""
    info = init_distributed(cfg.run.resolved_device())
    check_parallel(cfg.run.parallel, info)
    grad_accum = resolve_grad_accum(cfg.run, info.world_size)
    if cfg.model.path != "demo":
        model_path(cfg.model.path)  # a missing path fails here, before anything is written
    out_dir, resume = prepare_output(cfg, cfg.run, info)
    tok = load_tokenizer(model_path(cfg.model.path))
    log = MetricsLogger(out_dir, cfg.wandb, to_dict(cfg), enabled=info.is_main)
    return RunContext(info, info.device, out_dir, resume, tok, log, grad_accum)


def finish_run(model: nn.Module, ctx: RunContext, summary: dict, *, adapter: str | None, base_name: str, step: int = 0,
               final_metrics: dict | None = None, extra_tensors: dict | None = None, task_type: str = "CAUSAL_LM",
               print_summary: bool = True, adapter_metadata: dict | None = None) -> None:
    """The end of every recipe: the trained adapter (gathered from every rank) saved as a PEFT
    folder <output_dir>/adapter, the final metrics logged, summary.json written (and printed),
    the logger closed, the process group torn down."""
    sd = gathered_adapter(model, adapter) if adapter else None
    extra = {k: full_tensor(v.detach()).cpu() for k, v in (extra_tensors or {}).items()}  # FSDP shards a wrapped head
    if ctx.info.is_main:
        if adapter:
            save_adapter(base_model(model), ctx.out_dir / "adapter", adapter, state_dict=sd, extra_tensors=extra,
                         base_model_name_or_path=base_name, task_type=task_type, metadata=adapter_metadata)
        if final_metrics:
            ctx.log.log(step, **final_metrics)
        (ctx.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if print_summary:
            print(json.dumps(summary, indent=2))
    ctx.log.close()
    cleanup(model)


def prepare_output(cfg, run: RunSection, info: DistInfo) -> tuple[Path, Path | None]:
    """Creates the output folder, finds the checkpoint to resume from (refusing a folder with another
    run's checkpoints), settles the device-dependent settings, prints and saves the resolved config
    (so config.yaml is what runs). Returns (out_dir, resume_path)."""
    notes = cfg.model.resolve(info.device) if hasattr(cfg, "model") else []
    out = Path(run.output_dir)
    resume = resolve_resume(out, run.resume, run.overwrite) if info.is_main else None
    barrier()
    if not info.is_main:
        resume = resume_path(out, run.resume)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
        print(describe_run(cfg, resume), flush=True)
        for note in notes:
            print(f"note: {note}")
    return out, resume


def describe_run(cfg, resume: Path | None = None) -> str:
    """The first screen of a run: model, quantization, LoRA, data, steps and output folder in a few
    lines (the full resolved config is in <output_dir>/config.yaml)."""
    m, lora, d, r, o = (getattr(cfg, k, None) for k in ("model", "lora", "data", "run", "optim"))
    lines = []
    if m is not None:
        extras = [m.dtype] + ([f"{m.quant.quant_type.value} base (compute {m.quant.compute_dtype})"] if m.quant else [])
        extras += ["gradient checkpointing" + (" + CPU offload" if m.offload_activations else "")] \
            if m.gradient_checkpointing else []
        extras += [f"{m.attention.value} attention"] + (["compiled layers"] if m.compile else [])
        lines.append(f"model   {m.path} ({', '.join(extras)})")
    if lora is not None:
        targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
        lines.append(f"lora    r={lora.r} alpha={lora.alpha:g} dropout={lora.dropout:g} on {targets}")
    if d is not None:
        lines.append(f"data    {d.source}" + ("" if hasattr(cfg, "gen") else f", sequences of {d.seq_length} tokens"))
    rl = getattr(cfg, "grpo", None) or getattr(cfg, "ppo", None)  # RL recipes batch by rollouts, not run.batch_size
    if rl is not None:
        group = getattr(rl, "group_size", None) or getattr(rl, "samples_per_prompt", 1)
        lines.append(f"rollout {rl.rollout_batch} answers a step per rank ({rl.rollout_batch // group} prompts x {group})")
    if r is not None:
        steps = f"{r.max_steps} steps" if r.max_steps else f"{r.epochs:g} epoch(s)"
        lr = f", lr {o.lr:g}" if o is not None else ""
        batch = "" if rl is not None else f", batch {r.batch_size} x {r.grad_accum} accumulation per rank"
        lines.append(f"run     {steps}{batch}{lr}, seed {r.seed}" + (f", resuming from {resume}" if resume else ""))
        lines.append(f"output  {r.output_dir} (full config: config.yaml, metrics: metrics.jsonl)")
    return "\n".join(lines)


def build_base(m: ModelSection, device: torch.device) -> Transformer:
    """Loads the base (quantizing while reading when configured) and freezes it."""
    path = model_path(m.path)
    model = load_model(path, dtype=m.torch_dtype, device=device, quant=m.quant)
    if m.quant is not None:
        prepare_for_kbit_training(model, norm_dtype=m.torch_dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def check_memory(base: Transformer, model: ModelSection, lora: LoRAConfig | None, optim: OptimSection, run: RunSection,
                 device: torch.device, info: DistInfo, *, batch: int, seq: int, ce_chunk: int = 0) -> dict[str, int]:
    """Predicts the step's peak memory from the typed config (batch = sequences per forward), prints
    it on rank 0, and refuses a run that will not fit unless run.memory_check is false."""
    eight_bit = optim.name in (Optimizer.ADAMW_8BIT, Optimizer.PAGED_ADAMW_8BIT)
    plan = MemoryPlan(batch=batch, seq=seq, quant=model.quant, lora=lora, dtype=model.torch_dtype,
                      optimizer_state_bytes=2 if eight_bit else 8, gradient_checkpointing=model.gradient_checkpointing,
                      ce_chunk=ce_chunk, device=device.type, compiled=bool(model.compile),
                      offload=model.offload_activations)
    return check_fits(base.config, plan, enforce=run.memory_check, report=print if info.is_main else None)


def resolve_init_adapter(init_adapter: str, base_path: str) -> Path | None:
    """The adapter a DPO/PPO/GRPO run starts from, checked before any model is loaded: "auto" is
    the SFT recipe's default output (<SFT_OUTPUT_DIR>/adapter) when it exists, "" none, else a
    PEFT adapter folder trained on `base_path`."""
    if init_adapter == "auto":
        default = Path(SFT_OUTPUT_DIR) / "adapter"
        return default if (default / "adapter_config.json").exists() else None
    if not init_adapter:
        return None
    path = Path(init_adapter)
    config = path / "adapter_config.json"
    if not config.exists():
        raise MinituneError(f"init_adapter={init_adapter}: no adapter_config.json there (not a PEFT adapter folder)")
    base = json.loads(config.read_text()).get("base_model_name_or_path") or ""
    if base and base != base_path:
        raise MinituneError(f"init_adapter {path} was trained on base {base!r}, but model.path is {base_path!r}; "
                            f"set model.path={base} or start from an adapter of this base")
    return path


def attach_policy(base: Transformer, init: Path | None, lora: LoRAConfig) -> Callable:
    """Adds the trainable adapter "policy" to the frozen base and returns the reference: a function
    giving a context in which the model is the reference. From `init`: policy = a trainable copy
    of that adapter, reference = the same adapter frozen as "reference"; without: a fresh policy
    adapter, reference = the bare base. Either way one copy of the base weights."""
    if init is not None:
        load_adapter(base, init, "reference", trainable=False)
        load_adapter(base, init, "policy", trainable=True)
        for p in base.parameters():
            p.requires_grad_(False)
        for p in lora_parameters(base, "policy"):
            p.requires_grad_(True)
    else:
        apply_lora(base, lora, "policy")
    set_adapter(base, "policy")
    return (lambda: use_adapter(base, "reference")) if init is not None else (lambda: disable_adapters(base))


def finish_model(model: Transformer, m: ModelSection, run: RunSection, info: DistInfo,
                 head: nn.Module | None = None) -> nn.Module:
    """Attention path, packed CPU weights, compiled layers, gradient checkpointing (and offloading), then DDP or FSDP2
    around the model, or around `WithHead(model, head)`
    when a trainable head is given (so its gradients are synchronized like the adapter's). Returns the
    module to call in the training step."""
    set_attention(model, m.attention)
    if m.cpu_pack and not (run.parallel == Parallel.FSDP and info.world_size > 1):  # FSDP regathers weights each pass
        pack_linears(model, only_faster=True)
    if m.compile:
        compile_layers(model)  # before checkpointing, which wraps the compiled layers
    if m.gradient_checkpointing:
        apply_activation_checkpointing(model, offload=m.offload_activations)
    if head is not None:
        model = WithHead(model, head)
    if run.parallel == Parallel.DDP and info.world_size > 1:
        return apply_ddp(model, info)
    if run.parallel == Parallel.FSDP and info.world_size > 1:
        storage = m.quant.quant_storage if m.quant is not None and m.quant.is_4bit else None
        if storage is not None and as_dtype(storage) != m.torch_dtype:
            raise MinituneError(
                f"FSDP with a 4-bit base needs model.quant.quant_storage ({storage}) equal to model.dtype ({m.dtype}), "
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
    return adapter_state_dict(base_model(model), name, materialize=full_tensor)  # wrappers would prefix every name


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or inf."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def save_state(
    mgr: CheckpointManager, step: int, model: nn.Module, *, adapter: str, optimizer, scheduler, data_state: dict,
    info: DistInfo, extras: dict | None = None, head_tensors: dict[str, torch.Tensor] | None = None,
    base_name: str = "", task_type: str = "CAUSAL_LM", adapter_metadata: dict | None = None,
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
            save_adapter(base_model(model), tmp / "adapter", adapter, state_dict=sd, extra_tensors=heads,
                         base_model_name_or_path=base_name, task_type=task_type, metadata=adapter_metadata)
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
    lora, extra = split_adapter_tensors(tensors, ckpt)
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for path, ab in lora.items():
            target = layers[path].adapters[adapter]
            target.lora_A.copy_(ab["A"])
            target.lora_B.copy_(ab["B"])
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


__all__ = ["RunContext", "attach_policy", "build_base", "check_memory", "finish_model", "finish_run", "gathered_adapter",
           "model_path", "non_finite", "prepare_output", "resolve_init_adapter", "restore_adapter", "restore_state",
           "save_state", "start_run"]
