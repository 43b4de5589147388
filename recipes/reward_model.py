"""Pairwise reward modelling: a LoRA adapter plus a scalar head on the (optionally quantized) base.

    python recipes/reward_model.py                                       # embedded default (CPU)
    python recipes/reward_model.py --config recipes/configs/reward_hh_rlhf.yaml
    torchrun --nproc_per_node 8 recipes/reward_model.py --config ... run.parallel=ddp

The adapter is saved in PEFT format with the head as `base_model.model.score.weight`
(task_type SEQ_CLS, modules_to_save ["score"]); `minitune.reward.load_reward_adapter` loads it as a
second named adapter onto the base the PPO policy uses.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from minitune.data.shared_prompt import layout_pairs, tokenize_shared_pair
from minitune.data.preference import load_preference_pairs, pair_batches
from minitune.data.prompts import prompt_rendering
from minitune.distributed import all_reduce_sum, in_step
from minitune.errors import MinituneError
from minitune.lora import LoRAConfig, apply_lora
from minitune.reward import RewardHead, pair_rewards, pairwise_loss
from minitune.train.checkpointing import CheckpointManager
from minitune.train.cli import report_stop, run_recipe, should_save
from minitune.train.sections import DataSection, ModelSection, OptimSection, RunSection, SyntheticRejected, WandbSection
from minitune.train.setup import (build_base, check_memory, finish_model, finish_run, progress_bar, restore_adapter,
                                  restore_state, save_state, start_run)
from minitune.train.control import StopSignal, check_finite
from minitune.train.optim import build_optimizer, lr_lambda
from minitune.train.rng import seed_everything


@dataclass
class RewardSection:
    max_length: int = 256  # tokens per prompt + response; longer pairs are truncated (counted)
    margin: float = 0.0  # constant margin inside the sigmoid
    center_coef: float = 0.0  # coef * mean((r_chosen + r_rejected)^2); TRL suggests 0.01
    eval_batch_size: int = 16


@dataclass
class RewardConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataSection = field(default_factory=lambda: DataSection(synthetic_train=1200, synthetic_eval=200, holdout=300))
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-3, warmup_steps=5))
    run: RunSection = field(default_factory=lambda: RunSection(output_dir="outputs/reward_model", max_steps=60,
                                                               batch_size=8, save_every=20))
    wandb: WandbSection = field(default_factory=WandbSection)
    reward: RewardSection = field(default_factory=RewardSection)


def build_pairs(cfg: RewardConfig, tok, info):
    train, evals, stats = load_preference_pairs(cfg.data, tok, cfg.run.seed)
    tokenize = lambda ps: [tokenize_shared_pair(p, tok, cfg.reward.max_length, stats) for p in ps]  # noqa: E731
    train_ids, eval_ids = tokenize(train), tokenize(evals)
    if info.is_main:
        print(stats.summary())
    # every rank reads a disjoint share of the pairs
    return train_ids[info.rank::info.world_size], eval_ids[info.rank::info.world_size], stats


def pair_forward(model, pairs, pad_id, device):
    """(chosen, rejected) rewards of a batch of pairs: each pair's prompt once, both responses after
    it, packed into rows without padding; one forward of the model + head."""
    return pair_rewards(model, None, layout_pairs(pairs, pad_id).to(device))


@torch.no_grad()
def evaluate(model, pairs, cfg: RewardConfig, pad_id, device) -> dict:
    model.eval()
    rc, rr = [], []
    size = cfg.reward.eval_batch_size
    for batch, counts in in_step((pairs[s: s + size] for s in range(0, len(pairs), size)), model, device):
        c, r = pair_forward(model, batch, pad_id, device)  # under FSDP2 every rank runs as many forwards
        if counts:
            rc.append(c.float())
            rr.append(r.float())
    model.train()
    c, r = (torch.cat(rc), torch.cat(rr)) if rc else (torch.zeros(0, device=device), torch.zeros(0, device=device))
    m = pairwise_loss(c, r, margin=cfg.reward.margin, center_coef=cfg.reward.center_coef, reduction="sum")
    all_r = torch.cat([c, r])
    sums = all_reduce_sum(torch.stack([m.loss, (c > r).float().sum(), torch.tensor(float(len(c)), device=device),
                                       all_r.sum(), (all_r ** 2).sum()]))
    n = sums[2].clamp(min=1)
    mean = sums[3] / (2 * n)
    return {"eval_loss": (sums[0] / n).item(), "eval_accuracy": (sums[1] / n).item(), "eval_reward_mean": mean.item(),
            "eval_reward_std": (sums[4] / (2 * n) - mean ** 2).clamp(min=0).sqrt().item()}


def train(cfg: RewardConfig) -> dict:
    # 1. Set-up: process group, output folder and resume point, resolved config.
    if cfg.data.synthetic_rejected == SyntheticRejected.OWN:
        raise MinituneError("data.synthetic_rejected=own samples a start adapter's mistakes (DPO only); "
                            "the reward model takes echo or near_miss")
    ctx = start_run(cfg)
    info, device, out_dir, resume, tok, log, grad_accum = ctx
    seed_everything(cfg.run.seed)

    # 2. Data: tokenized pairs, each rank its own share (bad data stops here, before the model loads).
    train_pairs, eval_pairs, pair_stats = build_pairs(cfg, tok, info)
    if not train_pairs:
        raise MinituneError(f"every training pair was skipped ({pair_stats.summary()}); check "
                            "data.chosen_column / data.rejected_column and that the two sides differ")
    if len(train_pairs) < cfg.run.batch_size:
        raise MinituneError(f"only {len(train_pairs)} training pairs per rank; lower run.batch_size")
    total_steps = cfg.run.max_steps or max(1, int(cfg.run.epochs * len(train_pairs) / (cfg.run.batch_size * grad_accum)))

    # 3. Model: frozen base, LoRA adapter "reward", scalar head; checkpointing, DDP/FSDP around both.
    base = build_base(cfg.model, device)
    check_memory(base, cfg.model, cfg.lora, cfg.optim, cfg.run, device, info, batch=2 * cfg.run.batch_size,
                 seq=cfg.reward.max_length)  # chosen and rejected in one forward
    apply_lora(base, cfg.lora, "reward")
    head = RewardHead(base.config.hidden_size, device=device)
    if resume is not None:
        head.load(restore_adapter(base, resume, "reward"))
    model = finish_model(base, cfg.model, cfg.run, info, head=head)  # the head inside DDP/FSDP with the adapter
    seed_everything(cfg.run.seed + info.rank)

    # 4. Optimizer (adapter + head) and schedule.
    opt = build_optimizer(model.parameters(), cfg.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim, total_steps))
    step, batch_index = 0, 0
    if resume is not None:
        step, data_state, _ = restore_state(resume, opt, sched, info)
        batch_index = data_state["batch_index"]
    mgr = CheckpointManager(out_dir, cfg.run.keep_last)
    metadata = {"rendering": prompt_rendering(cfg.data, chat=False)}  # PPO/GRPO check their prompts against it
    last_ckpt = resume
    summary: dict = {"steps": total_steps, "train_pairs_per_rank": len(train_pairs), "eval_pairs_per_rank": len(eval_pairs)}
    if step == 0:
        summary["before"] = evaluate(model, eval_pairs, cfg, tok.pad_id, device)
        if info.is_main:
            print(f"held-out before training: {summary['before']}")
    t_start = time.perf_counter()

    # 5. The loop: pairs -> rewards -> pairwise loss -> clip -> step -> log / eval / save.
    batches = pair_batches(train_pairs, cfg.run.batch_size, cfg.run.seed + info.rank, batch_index)
    bar = progress_bar(total_steps, step, info, cfg.run, "reward")
    model.train()
    with StopSignal() as stop:
        while step < total_steps:
            t0 = time.perf_counter()
            stats = torch.zeros(3, device=device)  # loss sum, correct pairs, pairs
            for i in range(grad_accum):
                batch_index, pairs = next(batches)
                batch_index += 1
                c, r = pair_forward(model, pairs, tok.pad_id, device)
                m = pairwise_loss(c, r, margin=cfg.reward.margin, center_coef=cfg.reward.center_coef, reduction="sum")
                # mean over every pair of the global batch (DDP averages over ranks)
                (m.loss * info.world_size / (len(pairs) * grad_accum * info.world_size)).backward()
                stats += torch.stack([m.loss.detach(), (c > r).float().sum().detach(), torch.tensor(float(len(pairs)))])
            params = [p for p in model.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            all_reduce_sum(stats)
            loss, acc = (stats[0] / stats[2]).item(), (stats[1] / stats[2]).item()
            check_finite(step + 1, last_ckpt, loss=loss, gradient_norm=float(grad_norm))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if info.is_main and step % cfg.run.log_every == 0:
                log.log(step, loss=loss, accuracy=acc, lr=sched.get_last_lr()[0], grad_norm=float(grad_norm),
                        pairs_per_s=float(stats[2]) / (time.perf_counter() - t0))
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.2f}")
            bar.update(1)
            if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < total_steps:
                log.log(step, **evaluate(model, eval_pairs, cfg, tok.pad_id, device))
            requested = stop.anywhere(device)  # every rank stops after the same step
            stopping = requested is not None
            if should_save(cfg.run, step, total_steps, stopping):
                last_ckpt = save_state(mgr, step, model, adapter="reward", optimizer=opt, scheduler=sched,
                                       data_state={"batch_index": batch_index}, info=info, head_tensors=head.tensors(),
                                       base_name=cfg.model.path, task_type="SEQ_CLS", adapter_metadata=metadata)
            if stopping:
                report_stop(requested, step, last_ckpt, info.is_main)
                break
    bar.close()

    # 6. Final evaluation and the reward adapter + head.
    summary["after"] = evaluate(model, eval_pairs, cfg, tok.pad_id, device)
    summary.update(final_step=step, train_seconds=round(time.perf_counter() - t_start, 1), last_checkpoint=str(last_ckpt))
    finish_run(model, ctx, summary, adapter="reward", base_name=cfg.model.path, step=step, final_metrics=summary["after"],
               extra_tensors=head.tensors(), task_type="SEQ_CLS", adapter_metadata=metadata)
    return summary


def main(argv=None) -> int:
    return run_recipe(RewardConfig, train, argv)


if __name__ == "__main__":
    sys.exit(main())
