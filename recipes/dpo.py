"""Direct preference optimization (DPO, IPO, robust DPO) of a LoRA policy on the shared frozen base.

    python recipes/dpo.py                                   # embedded default: synthetic task, from the SFT adapter
    python recipes/dpo.py --config recipes/configs/dpo_hh_rlhf.yaml
    torchrun --nproc_per_node 8 recipes/dpo.py --config ... run.parallel=ddp

No second model: the reference is the same base with the adapters disabled or, when starting from
an adapter (`init_adapter`, e.g. the SFT one), a frozen copy of that adapter loaded beside the
trainable policy copy; its log-probs are computed under no-grad in the same step. Chosen and
rejected go through one forward that computes their shared prompt once (`minitune.data.shared_prompt`);
sequence log-probs sum over response tokens only (the prompt/response boundary comes from
tokenizing them separately). `data.seq_length` bounds prompt + response (longer pairs lose the
prompt's oldest tokens, the same for both sides, then the response's end; counted).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from minitune.data.shared_prompt import SharedLayout, layout_pairs, tokenize_shared_pair
from minitune.data.own_mistakes import own_mistake_pairs
from minitune.data.preference import load_preference_pairs, pair_batches
from minitune.data.synthetic import train_eval_split
from minitune.distributed import all_reduce_sum, in_step, unwrap
from minitune.dpo import DPOLossType, dpo_loss, response_logprobs
from minitune.errors import MinituneError, require
from minitune.evaluation import greedy_accuracy
from minitune.lora import LoRAConfig
from minitune.train.checkpointing import CheckpointManager
from minitune.train.cli import report_stop, run_recipe, should_save
from minitune.train.sections import DataSection, ModelSection, OptimSection, RunSection, SyntheticRejected, WandbSection
from minitune.train.setup import (attach_policy, build_base, check_memory, finish_model, finish_run, progress_bar,
                                  resolve_init_adapter, restore_adapter, restore_state, save_state, start_run)
from minitune.train.control import StopSignal, check_finite
from minitune.train.optim import build_optimizer, lr_lambda
from minitune.train.rng import seed_everything

@dataclass
class DPOSection:
    beta: float = 0.1  # strength of the pull toward the reference (the KL penalty's inverse temperature)
    loss: DPOLossType = DPOLossType.SIGMOID  # sigmoid (DPO) | ipo | robust
    label_smoothing: float = 0.0  # share of pairs assumed flipped: cDPO for sigmoid, the robust estimator for robust
    sft_weight: float = 0.0  # weight of an NLL term on the chosen responses (per response token)
    eval_batch_size: int = 16

    def __post_init__(self):
        require(self.beta > 0, "beta", self.beta, "must be > 0 (typical 0.05-0.5)")
        require(0 <= self.label_smoothing < 0.5, "label_smoothing", self.label_smoothing, "must be in [0, 0.5)")
        require(self.sft_weight >= 0, "sft_weight", self.sft_weight, "must be >= 0")
        require(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "must be >= 1")


@dataclass
class DPOConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # used only without init_adapter
    # Synthetic default: the reference answer preferred to a wrong answer the start adapter itself samples
    # (own_mistakes.py); made-up wrong answers taught nothing the greedy answers showed (README).
    data: DataSection = field(default_factory=lambda: DataSection(synthetic_train=1200, synthetic_eval=200, holdout=300,
                                                                  seq_length=256,
                                                                  synthetic_rejected=SyntheticRejected.OWN))
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=5e-5, warmup_steps=5))
    run: RunSection = field(default_factory=lambda: RunSection(output_dir="outputs/dpo", max_steps=60, batch_size=8,
                                                               save_every=20))
    wandb: WandbSection = field(default_factory=WandbSection)
    # On the synthetic task from the SFT adapter (held-out exact-match 0.625), inputs-given-back as the
    # rejected side, 40 steps of 8 pairs: plain DPO at lr 5e-5 -> 0.29 while preference accuracy reached
    # 0.99 (both sides' likelihood fell); + NLL on chosen (sft_weight 1) -> 0.505; at lr 1e-5 -> 0.625.
    # Own mistakes, lr 5e-5, 60 steps, sft_weight 1: -> 0.650.
    dpo: DPOSection = field(default_factory=lambda: DPOSection(sft_weight=1.0))
    init_adapter: str = "auto"  # adapter to start from (and reference); "auto": the SFT default's if present; "": none
    eval_accuracy: bool = True  # synthetic task: greedy exact-match accuracy on held-out prompts before/after
    eval_max_new_tokens: int = 32


def tokenize(pairs, tok, cfg: DPOConfig, stats):
    return [tokenize_shared_pair(p, tok, cfg.data.seq_length, stats) for p in pairs]


def sequence_logps(model, layout: SharedLayout, loss: DPOLossType) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [2N] as the loss compares them, summed log-probs [2N]) of each side's response,
    chosen sides first: summed for DPO and robust, mean per response token for IPO. One forward
    computes the prompt once for both sides and projects only the positions that predict a
    response token."""
    logits = model(layout.input_ids, layout.position_ids, layout.mask, logits_at=layout.predictors).logits
    summed, count = response_logprobs(logits, layout)
    return (summed / count.clamp(min=1) if loss == DPOLossType.IPO else summed), summed


def pair_metrics(model, reference, pairs, cfg: DPOConfig, pad_id: int, device, *, grad: bool):
    """(mean loss to backpropagate, sums tensor [loss, chosen reward, rejected reward, correct, kl, n])
    for one batch of tokenized pairs."""
    layout = layout_pairs(pairs, pad_id).to(device)
    n = len(pairs)
    with torch.set_grad_enabled(grad):
        logps, summed = sequence_logps(model, layout, cfg.dpo.loss)
    base = unwrap(model)
    was_training = base.training
    with torch.no_grad(), reference():
        base.eval()  # the reference is deterministic: no adapter dropout
        ref_logps, ref_summed = sequence_logps(base, layout, cfg.dpo.loss)
    base.train(was_training)
    out = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta=cfg.dpo.beta, loss_type=cfg.dpo.loss,
                   label_smoothing=cfg.dpo.label_smoothing)
    loss = out.losses.mean()
    if cfg.dpo.sft_weight:
        chosen_tokens = (layout.sides < n).sum().clamp(min=1)
        loss = loss + cfg.dpo.sft_weight * (-summed[:n].sum() / chosen_tokens)
    kl = (summed - ref_summed).detach().mean()  # KL proxy: policy minus reference log-prob per sequence
    sums = torch.stack([out.losses.detach().sum(), out.chosen_rewards.sum(), out.rejected_rewards.sum(),
                        (out.chosen_rewards > out.rejected_rewards).float().sum(), kl * n, torch.tensor(float(n), device=device)])
    return loss, sums


def as_metrics(sums: torch.Tensor, prefix: str = "") -> dict:
    n = sums[5].clamp(min=1)
    c, r = (sums[1] / n).item(), (sums[2] / n).item()
    return {f"{prefix}loss": (sums[0] / n).item(), f"{prefix}rewards_chosen": c, f"{prefix}rewards_rejected": r,
            f"{prefix}margin": c - r, f"{prefix}accuracy": (sums[3] / n).item(), f"{prefix}kl": (sums[4] / n).item()}


@torch.no_grad()
def evaluate(model, reference, pairs, cfg: DPOConfig, pad_id, device) -> dict:
    """Held-out DPO loss, implicit rewards, preference accuracy and KL proxy (all ranks)."""
    model.eval()
    total = torch.zeros(6, device=device)
    size = cfg.dpo.eval_batch_size
    for batch, counts in in_step((pairs[s: s + size] for s in range(0, len(pairs), size)), model, device):
        sums = pair_metrics(model, reference, batch, cfg, pad_id, device, grad=False)[1]  # every rank as many forwards
        if counts:
            total += sums
    model.train()
    return as_metrics(all_reduce_sum(total), "eval_")


def train(cfg: DPOConfig) -> dict:
    # 1. Set-up: process group, output folder and resume point, the start adapter (checked first).
    init = resolve_init_adapter(cfg.init_adapter, cfg.model.path)
    ctx = start_run(cfg)
    info, device, out_dir, resume, tok, log, grad_accum = ctx

    # 2. Data: tokenized pairs with their prompt boundary, each rank its own share (with
    # data.synthetic_rejected=own the training pairs are sampled once the model is built, below).
    own = cfg.data.source == "synthetic" and cfg.data.synthetic_rejected == SyntheticRejected.OWN
    train_pairs, eval_pairs, stats = load_preference_pairs(cfg.data, tok, cfg.run.seed)
    eval_ids = tokenize(eval_pairs, tok, cfg, stats)[info.rank::info.world_size]
    train_ids = []
    if own:
        stats.kept = len(eval_pairs)  # the training pairs come below
    else:
        train_ids = tokenize(train_pairs, tok, cfg, stats)
        if info.is_main:
            print(stats.summary())
        if not train_ids:
            raise MinituneError(f"every training pair was skipped ({stats.summary()}); check "
                                "data.chosen_column / data.rejected_column and that the two sides differ")
        train_ids = train_ids[info.rank::info.world_size]
        if len(train_ids) < cfg.run.batch_size:
            raise MinituneError(f"only {len(train_ids)} training pairs per rank; lower run.batch_size")

    # 3. Model: one frozen base; policy adapter (a trainable copy of init, or fresh) and the reference.
    seed_everything(cfg.run.seed)
    base = build_base(cfg.model, device)
    check_memory(base, cfg.model, cfg.lora, cfg.optim, cfg.run, device, info, batch=2 * cfg.run.batch_size,
                 seq=cfg.data.seq_length)  # chosen and rejected in one forward
    reference = attach_policy(base, init, cfg.lora)
    if own:  # the start adapter's (the reference's) mistakes: the same pairs whether or not the run resumed
        examples = train_eval_split(cfg.data.synthetic_train, cfg.data.synthetic_eval, seed=cfg.run.seed)[0]
        wanted = cfg.run.max_steps * cfg.run.batch_size * grad_accum or len(examples)
        with reference():
            pairs, mistakes = own_mistake_pairs(base, tok, examples[info.rank::info.world_size], wanted=wanted,
                                                seed=cfg.run.seed + info.rank, device=device)
        stats.kept += len(pairs)
        train_ids = tokenize(pairs, tok, cfg, stats)
        if info.is_main:
            print(f"{mistakes.summary()}; held-out pairs: near misses; {stats.summary()}")
        if len(train_ids) < cfg.run.batch_size:
            raise MinituneError(f"the start adapter got only {len(train_ids)} training prompts wrong; "
                                "set data.synthetic_rejected=near_miss or raise data.synthetic_train")
    total_steps = cfg.run.max_steps or max(1, int(cfg.run.epochs * len(train_ids) / (cfg.run.batch_size * grad_accum)))
    if resume is not None:
        restore_adapter(base, resume, "policy")
    model = finish_model(base, cfg.model, cfg.run, info)
    seed_everything(cfg.run.seed + info.rank)
    if info.is_main:
        print(f"policy starts from {init or 'a fresh adapter'}; reference = {'that adapter, frozen' if init else 'the base'}; "
              f"{cfg.dpo.loss.value} loss, beta {cfg.dpo.beta:g}; {total_steps} steps")

    # 4. Optimizer and schedule.
    opt = build_optimizer(model.parameters(), cfg.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim, total_steps))
    step, batch_index = 0, 0
    if resume is not None:
        step, data_state, _ = restore_state(resume, opt, sched, info)
        batch_index = data_state["batch_index"]
    mgr = CheckpointManager(out_dir, cfg.run.keep_last)
    last_ckpt = resume
    held_out = train_eval_split(cfg.data.synthetic_train, cfg.data.synthetic_eval, seed=cfg.run.seed)[1] \
        if cfg.data.source == "synthetic" and cfg.eval_accuracy else None
    summary: dict = {"steps": total_steps, "train_pairs_per_rank": len(train_ids), "eval_pairs_per_rank": len(eval_ids),
                     "start_adapter": str(init or "")}
    t_start = time.perf_counter()
    if step == 0:
        summary["before"] = evaluate(model, reference, eval_ids, cfg, tok.pad_id, device)
        if held_out is not None:
            summary["before"]["eval_exact_match"] = greedy_accuracy(
                unwrap(model), tok, held_out, max_new_tokens=cfg.eval_max_new_tokens, device=device)[0]
        if info.is_main:
            print(f"held-out before training: {summary['before']}")
            log.log(0, **summary["before"])

    # 5. The loop: pairs -> policy and reference log-probs -> DPO loss -> clip -> finite check -> step.
    batches = pair_batches(train_ids, cfg.run.batch_size, cfg.run.seed + info.rank, batch_index)
    bar = progress_bar(total_steps, step, info, cfg.run, "dpo")
    model.train()
    with StopSignal() as stop:
        while step < total_steps:
            t0 = time.perf_counter()
            sums = torch.zeros(6, device=device)
            for i in range(grad_accum):
                batch_index, pairs = next(batches)
                batch_index += 1
                loss, part = pair_metrics(model, reference, pairs, cfg, tok.pad_id, device, grad=True)
                (loss / grad_accum).backward()  # DDP averages over ranks: the mean over the global batch
                sums += part
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       cfg.optim.grad_clip)
            metrics = as_metrics(all_reduce_sum(sums))
            check_finite(step + 1, last_ckpt, loss=metrics["loss"], gradient_norm=float(grad_norm))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if info.is_main and step % cfg.run.log_every == 0:
                log.log(step, **metrics, lr=sched.get_last_lr()[0], grad_norm=float(grad_norm),
                        pairs_per_s=float(sums[5]) / (time.perf_counter() - t0))
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.2f}", margin=f"{metrics['margin']:.3f}")
            bar.update(1)
            if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < total_steps:
                log.log(step, **evaluate(model, reference, eval_ids, cfg, tok.pad_id, device))
            requested = stop.anywhere(device)  # every rank stops after the same step
            stopping = requested is not None
            if should_save(cfg.run, step, total_steps, stopping):
                last_ckpt = save_state(mgr, step, model, adapter="policy", optimizer=opt, scheduler=sched,
                                       data_state={"batch_index": batch_index}, info=info, base_name=cfg.model.path)
            if stopping:
                report_stop(requested, step, last_ckpt, info.is_main)
                break
    bar.close()

    # 6. Final evaluation and the policy adapter.
    summary["after"] = evaluate(model, reference, eval_ids, cfg, tok.pad_id, device)
    if held_out is not None and step == total_steps:
        summary["after"]["eval_exact_match"] = greedy_accuracy(
            unwrap(model), tok, held_out, max_new_tokens=cfg.eval_max_new_tokens, device=device)[0]
    summary.update(final_step=step, train_seconds=round(time.perf_counter() - t_start, 1), last_checkpoint=str(last_ckpt))
    finish_run(model, ctx, summary, adapter="policy", base_name=cfg.model.path, step=step, final_metrics=summary["after"])
    return summary


def main(argv=None) -> int:
    return run_recipe(DPOConfig, train, argv)


if __name__ == "__main__":
    sys.exit(main())
