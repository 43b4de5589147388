"""PPO with policy, reference, value and reward on one shared frozen base.

    python recipes/ppo.py                                   # embedded default: synthetic task, CPU
    python recipes/ppo.py --config recipes/configs/ppo_hh_rlhf.yaml
    torchrun --nproc_per_node 8 recipes/ppo.py --config ... run.parallel=ddp

One copy of the base weights serves everything: the policy is LoRA adapter "policy"; the reference is
the base with adapters disabled (or, when starting from an SFT adapter, a frozen copy of it named
"reference"); the value function is a head on the policy's last hidden state; the reward is either a
Python function (`module:function`) or a reward adapter + head from recipes/reward_model.py.
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field

import torch

from minitune.data.synthetic import is_correct
from minitune.distributed import all_reduce_max, all_reduce_sum, metrics_over_ranks, std_over_ranks, unwrap
from minitune.errors import MinituneError
from minitune.grpo import informative_groups
from minitune.lora import LoRAConfig, base_parameter_bytes, set_adapter
from minitune.ppo import (AdaptiveKLController, FixedKLController, PPOSettings, PPOStats, RunningMoments, Trajectory,
                          ValueHead, explained_variance, leave_one_out_baseline, ppo_update, response_diversity,
                          trajectory)
from minitune.reward import load_reward_adapter
from minitune.rl_eval import HeldOutEval
from minitune.rollout import (Rollout, answer_penalties, check_reward_adapter, empty_answers, load_prompts,
                              prompts_system, prompts_use_chat, resolve_reward_fn, sample_rollout, score_rollout)
from minitune.train.checkpointing import CheckpointManager
from minitune.train.cli import report_stop, run_recipe, should_save
from minitune.train.sections import (DataSection, GenSection, HeldOutSection, ModelSection, OptimSection,
                                     RewardSource, RunSection, WandbSection)
from minitune.train.setup import (attach_policy, build_base, finish_model, finish_run, progress_bar,
                                  resolve_init_adapter, restore_adapter, restore_state, save_state, start_run)
from minitune.train.control import StopSignal, check_finite
from minitune.train.optim import build_optimizer
from minitune.train.rng import random_state, seed_everything, set_random_state


@dataclass
class PPOConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # CPU default (README, docs/rl_synthetic.md): 32 fresh training prompts a step (the SFT default's 2,000) x 8
    # answers at temperature 0.7, the greedy answer first in each group; each score minus its prompt's other
    # answers' mean (RLOO), no value function (one small head cannot predict per-prompt success), prompts whose
    # answers all scored alike skipped, a fixed KL weight 0.04, one epoch: held-out 0.630 -> 0.670 in 20 steps
    # (9 min). The earlier default, a pool of 32 prompts x 4 answers, learnt its pool (0.61 -> 0.77 per pass) and
    # lost held-out answers (0.630 -> 0.585). Held out: 200 prompts neither SFT nor PPO trains on.
    data: DataSection = field(default_factory=lambda: DataSection(synthetic_train=2000, synthetic_eval=200))
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-4, warmup_steps=0, schedule="constant"))
    run: RunSection = field(default_factory=lambda: RunSection(output_dir="outputs/ppo", max_steps=20, save_every=10,
                                                               eval_every=10))
    wandb: WandbSection = field(default_factory=WandbSection)
    ppo: PPOSettings = field(default_factory=lambda: PPOSettings(
        rollout_batch=256, samples_per_prompt=8, group_baseline=True, use_value=False, skip_equal_groups=True,
        mini_batch=128, ppo_epochs=1, adaptive_kl=False, init_kl_coef=0.04))
    # 32 new tokens: every answer fits; T 0.7: a prompt the greedy answer gets right mostly gives equal scores
    gen: GenSection = field(default_factory=lambda: GenSection.synthetic(temperature=0.7, greedy_member=True))
    reward: RewardSource = field(default_factory=RewardSource)
    init_adapter: str = "auto"  # SFT adapter to start from; "auto": the SFT default's (f"{SFT_OUTPUT_DIR}/adapter") if present; "": none
    sample_every: int = 4
    held_out: HeldOutSection = field(default_factory=HeldOutSection)  # 200 prompts never trained on, greedy


# ----------------------------------------------------------------------------------------------


def scores_for(cfg, ro: Rollout, model, reward_head, reward_fn, moments: RunningMoments, device):
    """(scores [B], raw [B]): reward adapter or function, then baseline / normalization / clip / penalty."""
    raw = score_rollout(ro, model, reward_head=reward_head, reward_fn=reward_fn, name=cfg.reward.function, device=device)
    s = raw * cfg.ppo.score_scale
    moments.update(s)
    if cfg.ppo.group_baseline:
        s = leave_one_out_baseline(s, cfg.ppo.samples_per_prompt)
    if cfg.ppo.score_baseline:
        s = s - moments.mean
    if cfg.ppo.score_norm:
        s = s / (moments.var ** 0.5 + 1e-8)
    if cfg.ppo.score_clip > 0:
        s = s.clamp(-cfg.ppo.score_clip, cfg.ppo.score_clip)
    return s - answer_penalties(ro, cfg.reward).to(s.device), raw


def make_trajectory(cfg: PPOConfig, ro: Rollout, policy, reference, reward_head, reward_fn,
                    moments: RunningMoments, kl_coef: float, device, skip: bool
                    ) -> tuple[Trajectory | None, torch.Tensor, torch.Tensor | None, float]:
    """(trajectory, raw scores [B], non-score rewards, signal share) of a rollout: scored (2), then
    log-probs, values, per-token rewards and advantages (3-5, `minitune.ppo.trajectory`), without
    grad, eval mode. With `skip`, only the prompts whose answers' scores differ go on (None when no
    prompt's do on any rank); under torchrun each rank tops its prompts up with skipped ones to the
    count of the rank with the most, so every rank runs the same forwards and optimizer steps. The
    signal share is the fraction of this rank's prompts whose answers' scores differ."""
    policy.eval()
    with torch.no_grad():
        scores, raw = scores_for(cfg, ro, policy, reward_head, reward_fn, moments, device)
    k = cfg.ppo.samples_per_prompt
    signal = informative_groups(scores, k).cpu() if k > 1 else torch.ones(len(raw), dtype=torch.bool)
    seq, mask, rmask = ro.gen.sequences, ro.attention_mask, ro.gen.mask
    if skip:
        keep = signal.clone()
        most = int(all_reduce_max(keep.sum().to(device)).item())
        keep[(~keep).nonzero().flatten()[: most - int(keep.sum())]] = True
        if most == 0:
            return None, raw, None, 0.0
        rows = (keep.nonzero().flatten()[:, None] * k + torch.arange(k)).flatten().to(seq.device)
        seq, mask, rmask, scores = seq[rows], mask[rows], rmask[rows], scores[rows.to(scores.device)]
    traj, non_score = trajectory(policy, reference, seq, mask, rmask, scores, cfg.ppo, temperature=cfg.gen.temperature,
                                 kl_coef=kl_coef)
    return traj, raw, non_score, signal.float().mean().item()


def step_stats(cfg: PPOConfig, ro: Rollout, traj: Trajectory | None, raw, non_score, mb_stats: list[PPOStats],
               skipped: int, kl_mean: float, kl_coef: float, seconds: tuple[float, float, float], signal: float) -> dict:
    """The step's metrics: scores, KL, losses, clip fractions, lengths, and where the time went. KL,
    losses and the non-score reward cover the rows trained on (all, unless ppo.skip_equal_groups); a
    metric with no value this step (no row trained, or no value function) is left out. Under torchrun
    they are the whole job's (`metrics_over_ranks`): means over the ranks' equal-sized rollouts, trained
    rows and throughputs added, durations the slowest rank's."""
    B, (t_gen, t_score, t_train) = len(ro.responses), seconds
    nan = float("nan")
    mean = lambda name: torch.stack([getattr(s, name) for s in mb_stats]).mean().item() if mb_stats else float("nan")  # noqa: E731
    stats = {
        "score_mean": raw.mean().item(),
        "non_score_reward": non_score.sum(1).mean().item() if non_score is not None else nan, "kl": kl_mean,
        "kl_coef": kl_coef, "signal_share": signal, "trained_rows": len(traj.sequences) if traj is not None else 0,
        "entropy": mean("entropy"), "pg_loss": mean("pg_loss"), "vf_loss": mean("vf_loss"),
        "pg_clipfrac": mean("pg_clipfrac"), "vf_clipfrac": mean("vf_clipfrac"), "approx_kl": mean("approx_kl"),
        "ratio_mean": mean("ratio_mean"), "skipped_minibatches": skipped,
        "explained_variance": explained_variance(traj.values, traj.returns, traj.response_mask) if traj is not None else nan,
        "response_length": ro.gen.lengths.float().mean().item(), "diversity": response_diversity(ro.responses),
        "no_eos_share": 1.0 - ro.gen.ended.float().mean().item(),  # cut off by the length budget
        "stop_share": ro.stopped.float().mean().item(),  # ended by a gen.stop string
        "empty_share": empty_answers(ro.responses).float().mean().item(),  # nothing but whitespace
        # where the step's time goes: rollout generation, scoring (reward, policy/reference
        # log-probs, values, advantages), PPO update
        "gen_s": t_gen, "score_s": t_score, "update_s": t_train,
        "gen_tokens_per_s": float(ro.gen.lengths.sum()) / t_gen,
        "train_tokens_per_s": (cfg.ppo.ppo_epochs * float(traj.attention_mask.sum()) / max(t_train, 1e-6)) if traj is not None else nan,
        "prompts_truncated": ro.truncated,
    }
    if ro.references[0] is not None:
        stats["accuracy"] = sum(is_correct(r, ref) for r, ref in zip(ro.responses, ro.references)) / B
    if not cfg.ppo.use_value:  # no value function: its loss and fit would describe zeros
        for name in ("vf_loss", "vf_clipfrac", "explained_variance"):
            del stats[name]
    stats = metrics_over_ranks(stats, raw.device, summed=("trained_rows", "skipped_minibatches", "gen_tokens_per_s",
                                                          "train_tokens_per_s", "prompts_truncated"),
                               largest=("gen_s", "score_s", "update_s"))
    stats["score_std"] = std_over_ranks(raw)
    total = stats["gen_s"] + stats["score_s"] + stats["update_s"]
    stats |= {f"{k}_share": stats[f"{k}_s"] / total for k in ("gen", "score", "update")}
    return {k: v for k, v in stats.items() if v == v}  # a NaN (nothing trained this step) is left out, not logged


def check_config(cfg: PPOConfig) -> None:
    k = cfg.ppo.samples_per_prompt
    if k < 1 or cfg.ppo.rollout_batch % k:
        raise MinituneError(f"ppo.rollout_batch ({cfg.ppo.rollout_batch}) must be a multiple of "
                            f"ppo.samples_per_prompt ({k}): it counts responses, {k} per prompt")
    if cfg.ppo.mini_batch < 1 or cfg.ppo.mini_batch % k:
        raise MinituneError(f"ppo.mini_batch ({cfg.ppo.mini_batch}) must be a positive multiple of "
                            f"ppo.samples_per_prompt ({k}): a minibatch holds whole prompts with all their responses")
    if k < 2:  # one answer per prompt: every setting that compares a prompt's answers has to go, named at once
        within = [n for n, on in (("gen.greedy_member", cfg.gen.greedy_member), ("ppo.group_baseline", cfg.ppo.group_baseline),
                                  ("ppo.skip_equal_groups", cfg.ppo.skip_equal_groups)) if on]
        if within:
            raise MinituneError(f"ppo.samples_per_prompt={k} gives one answer per prompt, but {', '.join(within)} "
                                f"compare a prompt's answers: set ppo.samples_per_prompt to 2 or more, or "
                                f"{' '.join(n + '=false' for n in within)}")
    if cfg.ppo.skip_equal_groups and cfg.ppo.use_value:
        raise MinituneError("ppo.skip_equal_groups drops prompts whose answers all scored alike, but a value function "
                            "learns from every answer: set ppo.use_value=false or ppo.skip_equal_groups=false")
    if not 0 <= cfg.ppo.kl_coef_min <= cfg.ppo.init_kl_coef:
        raise MinituneError(f"ppo.kl_coef_min ({cfg.ppo.kl_coef_min}) must lie in [0, ppo.init_kl_coef "
                            f"({cfg.ppo.init_kl_coef})]: it is the floor the adaptive weight starts above")


def train(cfg: PPOConfig) -> dict:
    check_config(cfg)
    init = resolve_init_adapter(cfg.init_adapter, cfg.model.path)
    if cfg.reward.adapter:
        check_reward_adapter(cfg.data, cfg.reward.adapter)
    # 0. Set-up: process group, output folder, resume point, the one shared base.
    ctx = start_run(cfg)
    info, device, out_dir, resume, tok, log, _ = ctx
    seed_everything(cfg.run.seed)
    base = build_base(cfg.model, device)
    reference = attach_policy(base, init, cfg.lora)
    reward_head = load_reward_adapter(base, cfg.reward.adapter, "reward") if cfg.reward.adapter else None
    reward_fn = None if reward_head is not None else resolve_reward_fn(cfg.reward.function)
    value_head = ValueHead(base.config.hidden_size, cfg.ppo.value_dropout, device=device)
    if resume is not None:
        value_head.load(restore_adapter(base, resume, "policy"))
    value_head.requires_grad_(cfg.ppo.use_value)  # without a value function it gets no gradient (DDP would wait)
    set_adapter(base, "policy")
    base_bytes = base_parameter_bytes(base)
    model = finish_model(base, cfg.model, cfg.run, info, head=value_head)  # the value head inside DDP/FSDP
    seed_everything(cfg.run.seed + info.rank)
    if info.is_main:
        print(f"policy starts from {init or 'a fresh adapter'}; reference = {'adapter copy' if init else 'base'}; "
              f"reward = {cfg.reward.adapter or cfg.reward.function}")

    split = load_prompts(cfg.data, cfg.run.seed, tok)
    prompts, refs = split.prompts, split.references
    mine = list(range(info.rank, len(prompts), info.world_size))
    opt = build_optimizer(model.parameters(), cfg.optim)
    kl_ctl = (AdaptiveKLController(cfg.ppo.init_kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon, cfg.ppo.kl_coef_min)
              if cfg.ppo.adaptive_kl else FixedKLController(cfg.ppo.init_kl_coef))
    moments = RunningMoments()
    step, cursor, data_state = 0, 0, {}
    if resume is not None:
        step, data_state, extras = restore_state(resume, opt, None, info)
        cursor = data_state["cursor"]
        kl_ctl.load_state_dict(extras["kl_ctl"])
        moments = RunningMoments(**extras["moments"])
    mgr = CheckpointManager(out_dir, cfg.run.keep_last)
    last_ckpt, history = resume, []
    rng = random.Random(cfg.run.seed + 7919 * info.rank + step)  # the sampler's lengths and the minibatch order
    if resume is not None and "sampler" in data_state:  # where the uninterrupted run's was (checkpoints since 2026-11-30)
        set_random_state(rng, data_state["sampler"])
    bar = progress_bar(cfg.run.max_steps, step, info, cfg.run, "ppo")
    policy = unwrap(model)
    held_out = HeldOutEval(policy, tok, split, cfg, reward_head=reward_head, reward_fn=reward_fn, out_dir=out_dir,
                           log=log, is_main=info.is_main, device=device, reference=reference)
    if held_out and step == 0:
        held_out(0)
    with StopSignal() as stop:
        while step < cfg.run.max_steps:
            # 1. Rollout: sample prompts, generate with the policy (KV cache, no grad, eval mode).
            t0 = time.perf_counter()
            k = cfg.ppo.samples_per_prompt
            picked = [mine[(cursor + i) % len(mine)] for i in range(cfg.ppo.rollout_batch // k)]
            cursor += len(picked)
            ro = sample_rollout(policy, tok, [prompts[i] for i in picked], [refs[i] for i in picked], gen=cfg.gen, k=k,
                                rng=rng, chat=prompts_use_chat(cfg.data),
                                system=prompts_system(cfg.data), device=device)
            # 2-5. Scores, policy/reference log-probs and values, per-token rewards, advantages.
            traj, raw, non_score, signal = make_trajectory(cfg, ro, policy, reference, reward_head, reward_fn, moments,
                                                           kl_ctl.value, device, skip=cfg.ppo.skip_equal_groups)
            # 6. PPO epochs over shuffled minibatches: clipped policy and value losses.
            t1 = time.perf_counter()
            mb_stats, skipped = ppo_update(model, traj, opt, cfg.ppo, temperature=cfg.gen.temperature,
                                           grad_clip=cfg.optim.grad_clip, rng=rng,
                                           check=lambda **v: check_finite(step + 1, last_ckpt, **v)
                                           ) if traj is not None else ([], 0)
            t_train = time.perf_counter() - t1
            # 7. KL controller (over the rows trained on), stats, samples, checkpoint.
            kl_mean = float("nan")
            if traj is not None:
                kl_mean = all_reduce_sum(traj.kl.sum(1).mean().clone()).item() / info.world_size
                kl_ctl.update(kl_mean, len(traj.sequences) * info.world_size)
            step += 1
            stats = step_stats(cfg, ro, traj, raw, non_score, mb_stats, skipped, kl_mean, kl_ctl.value,
                               (ro.seconds, t1 - t0 - ro.seconds, t_train), signal)
            history.append(stats)
            if info.is_main:
                log.log(step, **stats)
                if cfg.sample_every and step % cfg.sample_every == 0:
                    for t, r, sc in list(zip(ro.prompts, ro.responses, raw.tolist()))[:2]:
                        print(f"\n[step {step}] prompt: {t[:100]!r}\n  response: {r[:160]!r}\n  score: {sc:.3f}")
            bar.set_postfix(score=f"{stats['score_mean']:.3f}", kl=f"{kl_mean:.3f}")
            bar.update(1)
            if held_out and cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < cfg.run.max_steps:
                held_out(step)
            requested = stop.anywhere(device)  # every rank stops after the same step
            stopping = requested is not None
            if should_save(cfg.run, step, cfg.run.max_steps, stopping):
                last_ckpt = save_state(mgr, step, model, adapter="policy", optimizer=opt, scheduler=None,
                                       data_state={"cursor": cursor, "sampler": random_state(rng)}, info=info, head_tensors=value_head.tensors(),
                                       base_name=cfg.model.path,
                                       extras={"kl_ctl": kl_ctl.state_dict(), "moments": vars(moments)})
            if stopping:
                report_stop(requested, step, last_ckpt, info.is_main)
                break
    bar.close()
    summary = {"steps": step, "last_checkpoint": str(last_ckpt), "base_param_bytes": base_bytes}
    if held_out and step == cfg.run.max_steps:
        held_out(step)
    summary |= held_out.summary()
    if info.is_main and (line := held_out.describe()):
        print(line)
    summary["history"] = history
    # the policy as a PEFT folder <output_dir>/adapter (with the value head when there is one), as every recipe saves
    finish_run(model, ctx, summary, adapter="policy", base_name=cfg.model.path, print_summary=False,
               extra_tensors=value_head.tensors() if cfg.ppo.use_value else None)
    return summary


def main(argv=None) -> int:
    return run_recipe(PPOConfig, train, argv)


if __name__ == "__main__":
    sys.exit(main())
