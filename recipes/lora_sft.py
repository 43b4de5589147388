"""LoRA / QLoRA supervised fine-tuning.

    python recipes/lora_sft.py                                   # embedded default (CPU, minutes)
    python recipes/lora_sft.py --config recipes/configs/llama3_8b_qlora.yaml lora.r=32 optim.lr=1e-4
    torchrun --nproc_per_node 8 recipes/lora_sft.py --config recipes/configs/llama3_8b_fsdp.yaml

The embedded default trains SmolLM2-135M-Instruct on the project's synthetic task and prints
exact-match accuracy on held-out prompts before and after.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field

import torch

from minitune.data import Columns, ConstantLengthDataset, make_formatter
from minitune.data.loading import train_and_eval_rows
from minitune.data.packing import PackingStats, no_tokens_error
from minitune.data.synthetic import train_eval_split
from minitune.distributed import all_ranks, all_reduce_sum, in_step, unwrap
from minitune.errors import MinituneError
from minitune.evaluation import greedy_accuracy
from minitune.lora import LoRAConfig, apply_lora, base_parameter_bytes
from minitune.train.checkpointing import CheckpointManager
from minitune.train.cli import report_stop, run_recipe, should_save
from minitune.train.sections import SFT_OUTPUT_DIR, DataSection, ModelSection, OptimSection, RunSection, WandbSection
from minitune.train.setup import (build_base, check_memory, finish_model, finish_run, progress_bar, restore_adapter,
                                  restore_state, save_state, start_run)
from minitune.train.control import StopRequested, StopSignal, check_finite
from minitune.train.loss import cross_entropy_sum
from minitune.train.optim import build_optimizer, lr_lambda
from minitune.train.rng import seed_everything


@dataclass
class EvalSection:
    # synthetic task: exact-match accuracy of greedy answers to the held-out prompts before and after (and every
    # run.eval_every steps), logged as eval_exact_match, the name the RL recipes give the same measurement
    accuracy: bool = True
    max_new_tokens: int = 32
    samples: int = 3  # generations printed at each eval
    batch_size: int = 50


@dataclass
class SFTConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=lambda: RunSection(output_dir=SFT_OUTPUT_DIR, max_steps=60,
                                                               batch_size=4, eval_every=0, save_every=20))
    wandb: WandbSection = field(default_factory=WandbSection)
    eval: EvalSection = field(default_factory=EvalSection)
    ce_chunk: int = 256  # > 0: fused lm_head + cross-entropy over this many tokens at a time (no [B, T, V] logits); 0: plain


# ----------------------------------------------------------------------------------------------


def build_data(cfg: SFTConfig, tok, info):
    """(train dataset, eval dataset, eval examples for generation accuracy or None)."""
    d = cfg.data
    examples = None
    if d.source == "synthetic":
        train_rows, eval_rows = train_eval_split(d.synthetic_train, d.synthetic_eval, seed=cfg.run.seed)
        examples = eval_rows
    else:
        needed = {"text": [d.text_column], "stackllama": [d.prompt_column, d.response_column],
                  "chat": [d.messages_column], "alpaca": ["instruction", "output"]}[d.template.value]
        train_rows, eval_rows = train_and_eval_rows(d.source, needed, eval_source=d.eval_source, holdout=d.holdout,
                                                    max_rows=d.max_rows, seed=cfg.run.seed)
    cols = Columns(text=d.text_column, prompt=d.prompt_column, response=d.response_column, messages=d.messages_column)
    fmt = make_formatter(d.template, tok, cols, completion_only=d.completion_only)
    shard = (info.rank, info.world_size)
    train = ConstantLengthDataset(train_rows, fmt, seq_length=d.seq_length, pad_id=tok.pad_id, infinite=True,
                                  shuffle_buffer=d.shuffle_buffer, seed=cfg.run.seed, shard=shard)
    evals = ConstantLengthDataset(eval_rows, fmt, seq_length=d.seq_length, pad_id=tok.pad_id, drop_last=False, shard=shard)
    return train, evals, examples


def batches(ds_iter, n: int, device):
    out = []
    for _ in range(n):
        out.append({k: v.to(device) for k, v in next(ds_iter).items()})
    return {k: torch.stack([b[k] for b in out]) for k in out[0]}


def token_loss_sum(model, batch, ce_chunk: int) -> torch.Tensor:
    out = model(batch["input_ids"], batch["position_ids"], return_logits=False)
    return cross_entropy_sum(out.hidden, batch["labels"], unwrap(model).lm_head, ce_chunk)


@torch.no_grad()
def evaluate(model, eval_ds, cfg: SFTConfig, device) -> dict:
    """Held-out token-mean loss and perplexity over the whole eval split (all ranks)."""
    model.eval()
    total = torch.zeros(2, device=device)
    it = iter(eval_ds)
    batches = iter(lambda: [b for _, b in zip(range(cfg.run.batch_size), it)], [])  # until a batch comes out empty
    for blocks, counts in in_step(batches, model, device):  # under FSDP2 every rank runs as many forwards
        batch = {k: torch.stack([b[k] for b in blocks]).to(device) for k in blocks[0]}
        loss_sum = token_loss_sum(model, batch, cfg.ce_chunk).float()
        if counts:
            total += torch.stack([loss_sum, (batch["labels"] != -100).sum().float()])
    all_reduce_sum(total)
    loss = (total[0] / total[1].clamp(min=1)).item()
    model.train()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}


def answer_accuracy(model, tok, examples, cfg: SFTConfig, device) -> tuple[float, list[tuple[str, str, str]]]:
    """Greedy answers to held-out synthetic prompts; (exact-match accuracy, a few samples)."""
    acc, rows = greedy_accuracy(unwrap(model), tok, examples, max_new_tokens=cfg.eval.max_new_tokens,
                                batch_size=cfg.eval.batch_size, device=device)
    return acc, rows[: cfg.eval.samples]


def packing_stats(train_ds: ConstantLengthDataset) -> PackingStats:
    """One pass over the whole train split (every rank's share): documents, tokens, blocks, empty and
    split documents. Turns run.epochs into steps, and refuses data with no token before the model loads."""
    one_pass = ConstantLengthDataset(train_ds.source, train_ds.formatter, seq_length=train_ds.seq_length, shard=(0, 1))
    for _ in one_pass:
        pass
    st = one_pass.stats
    if st.documents == 0:
        raise no_tokens_error(st.rows, train_ds.formatter)
    return st


# ----------------------------------------------------------------------------------------------


def train(cfg: SFTConfig) -> dict:
    # 1. Set-up: process group, output folder and resume point, resolved config.
    ctx = start_run(cfg)
    info, device, out_dir, resume, tok, log, grad_accum = ctx

    # 2. Data: packed blocks, sharded by rank; one pass for the packing stats (bad data stops here,
    #    before the model loads).
    train_ds, eval_ds, examples = build_data(cfg, tok, info)
    stats = packing_stats(train_ds)
    tokens_per_step = cfg.run.batch_size * grad_accum * info.world_size * cfg.data.seq_length
    total_steps = cfg.run.max_steps or max(1, math.ceil(cfg.run.epochs * stats.tokens / tokens_per_step))
    if info.is_main:
        print(stats.summary())
        (out_dir / "data_stats.json").write_text(json.dumps(vars(stats), indent=2))

    # 3. Model: frozen (optionally quantized) base, LoRA adapter, checkpointing, DDP/FSDP.
    seed_everything(cfg.run.seed)  # identical LoRA init on every rank (FSDP2 does not broadcast)
    base = build_base(cfg.model, device)
    if cfg.data.seq_length > base.config.max_position_embeddings:
        raise MinituneError(f"data.seq_length={cfg.data.seq_length} exceeds the model's context "
                            f"({base.config.max_position_embeddings}); lower data.seq_length")
    check_memory(base, cfg.model, cfg.lora, cfg.optim, cfg.run, device, info, batch=cfg.run.batch_size,
                 seq=cfg.data.seq_length, ce_chunk=cfg.ce_chunk)
    counts = apply_lora(base, cfg.lora)
    if info.is_main:
        print(f"trainable params: {counts['trainable']:,} of {counts['total']:,} ({counts['percent']:.2f}%); "
              f"{total_steps} steps of {tokens_per_step:,} tokens")
    if resume is not None:
        restore_adapter(base, resume, "default")
    base_bytes = base_parameter_bytes(base)  # before FSDP shards the storages
    model = finish_model(base, cfg.model, cfg.run, info)
    seed_everything(cfg.run.seed + info.rank)  # per-rank dropout streams

    # 4. Optimizer and schedule (restored with the data iterator and RNG when resuming).
    opt = build_optimizer(model.parameters(), cfg.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim, total_steps))
    step = 0
    if resume is not None:
        step, data_state, _ = restore_state(resume, opt, sched, info)
        train_ds.load_state_dict(data_state)
        if info.is_main:
            print(f"resumed from {resume} at step {step}")
    mgr = CheckpointManager(out_dir, cfg.run.keep_last)
    last_ckpt = resume
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.model.autocast and device.type == "cuda" else contextlib.nullcontext()
    summary: dict = {"steps": total_steps, "base_param_bytes": base_bytes, "packing": vars(stats)}
    do_accuracy = examples is not None and cfg.eval.accuracy
    # Where the run starts: before the first step, and where a run with evaluations every N steps resumes
    # (so its curves begin at the checkpoint's figures).
    if step == 0 or cfg.run.eval_every:
        when = "before training" if step == 0 else f"at step {step}, where the run resumes"
        summary["eval_loss_before"] = evaluate(model, eval_ds, cfg, device)["eval_loss"]
        if info.is_main:
            print(f"held-out loss {when}: {summary['eval_loss_before']:.4f}")
            log.log(step, eval_loss=summary["eval_loss_before"])
        if do_accuracy:
            acc, _ = answer_accuracy(model, tok, examples, cfg, device)
            summary["accuracy_before"] = acc
            if info.is_main:
                print(f"held-out exact-match accuracy {when}: {acc:.3f}")
                log.log(step, eval_exact_match=acc)

    # 5. The loop: micro-steps -> token-normalized loss -> clip -> finite check -> step -> log / eval / save.
    it = iter(train_ds)
    first_step = step
    bar = progress_bar(total_steps, step, info, cfg.run, "sft")
    model.train()
    with StopSignal() as stop:
        while step < total_steps:
            t0 = time.perf_counter()
            data_state = train_ds.state_dict()  # before this step's blocks: what a stop during the fetch saves
            try:
                with stop.interruptible():  # producing data can take long (or, with bad data, forever)
                    micro = [batches(it, cfg.run.batch_size, device) for _ in range(grad_accum)]
            except StopRequested:
                micro = None
            if not all_ranks(micro is not None, device):  # a rank stopped while fetching: no rank takes this step
                micro = None
            if micro is not None:
                n_tokens = all_reduce_sum(torch.tensor(float(sum((b["labels"] != -100).sum() for b in micro)), device=device))
                loss_sum = torch.zeros((), device=device)
                for i, b in enumerate(micro):
                    sync = contextlib.nullcontext() if i == grad_accum - 1 or not hasattr(model, "no_sync") else model.no_sync()
                    with sync, autocast:
                        part = token_loss_sum(model, b, cfg.ce_chunk)
                        # DDP/FSDP average gradients over ranks; scaling by world size makes the result
                        # the mean over every trained token of the global batch.
                        (part * info.world_size / n_tokens.clamp(min=1)).backward()
                    loss_sum += part.detach()
                grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip)
                loss = (all_reduce_sum(loss_sum) / n_tokens.clamp(min=1)).item()
                check_finite(step + 1, last_ckpt, loss=loss, gradient_norm=float(grad_norm))
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                dt = time.perf_counter() - t0
                lr = sched.get_last_lr()[0]
                if cfg.model.compile and step == first_step + 1:
                    summary["first_step_s"] = dt
                    if info.is_main:
                        print(f"first step {dt:.1f} s (includes compiling the decoder layers)")
                if info.is_main and step % cfg.run.log_every == 0:
                    log.log(step, loss=loss, lr=lr, grad_norm=float(grad_norm), tokens_per_s=tokens_per_step / dt,
                            trained_tokens=int(n_tokens.item()))
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / dt:.0f}")
                bar.update(1)
                if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < total_steps:
                    ev = evaluate(model, eval_ds, cfg, device)
                    if do_accuracy:
                        ev["eval_exact_match"] = answer_accuracy(model, tok, examples, cfg, device)[0]
                    log.log(step, **ev)
            requested = stop.anywhere(device)  # every rank stops after the same step
            stopping = requested is not None
            if should_save(cfg.run, step, total_steps, stopping):
                last_ckpt = save_state(mgr, step, model, adapter="default", optimizer=opt, scheduler=sched,
                                       data_state=train_ds.state_dict() if micro is not None else data_state,
                                       info=info, base_name=cfg.model.path)
            if stopping:
                report_stop(requested, step, last_ckpt, info.is_main)
                break
    bar.close()

    # 6. Final evaluation and the adapter.
    ev = evaluate(model, eval_ds, cfg, device)
    summary.update(ev, final_step=step, last_checkpoint=str(last_ckpt))
    if do_accuracy and step == total_steps:
        acc, samples = answer_accuracy(model, tok, examples, cfg, device)
        summary["accuracy_after"] = acc
        if info.is_main:
            log.log(step, eval_exact_match=acc)
        if info.is_main:
            for prompt, ans, ref in samples:
                print(f"  Q: {prompt}\n  A: {ans!r} (reference {ref})")
    finish_run(model, ctx, summary, adapter="default", base_name=cfg.model.path, step=step,
               final_metrics={k: v for k, v in summary.items() if isinstance(v, (int, float))})
    return summary


def main(argv=None) -> int:
    return run_recipe(SFTConfig, train, argv)


if __name__ == "__main__":
    sys.exit(main())
