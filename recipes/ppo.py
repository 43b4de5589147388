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

import importlib
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from minitune.adapters import load_adapter
from minitune.data import load_rows
from minitune.data.preference import split_hh
from minitune.data.prompts import encode_prompts
from minitune.data.synthetic import SYSTEM, is_correct, train_eval_split
from minitune.distributed import all_reduce_sum, cleanup, init_distributed, unwrap
from minitune.errors import MinituneError
from minitune.evaluation import greedy_accuracy
from minitune.generate import generate, left_pad, positions_from_mask
from minitune.lora import apply_lora, base_parameter_bytes, disable_adapters, set_adapter, use_adapter
from minitune.ppo import (AdaptiveKLController, FixedKLController, KLEstimator, Trajectory, check_scores,
                          entropy_from_logits, explained_variance, gae, kl_per_token, leave_one_out_baseline, logprobs_from_logits, per_token_rewards, ppo_losses, response_diversity, whiten)
from minitune.reward import load_reward_adapter, sequence_rewards
from minitune.tokenizer import load_tokenizer
from minitune.train.checkpointing import CheckpointManager
from minitune.train.cli import report_stop, run_recipe, should_save, write_summary
from minitune.train.config import to_dict
from minitune.train.metrics import MetricsLogger
from minitune.train.sections import DataSection, LoRASection, ModelSection, OptimSection, RunSection, WandbSection
from minitune.train.setup import (build_base, finish_model, model_path, prepare_output, progress_bar, restore_adapter,
                                  restore_state, save_state)
from minitune.train.utils import StopSignal, build_optimizer, check_finite, seed_everything


@dataclass
class PPOSection:
    """Defaults are TRL's legacy PPO as StackLLaMA used it."""

    rollout_batch: int = 16  # prompts per rollout per rank
    mini_batch: int = 4
    ppo_epochs: int = 4
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    ratio_threshold: float = 10.0  # skip a minibatch whose mean ratio exceeds this
    kl_estimator: KLEstimator = KLEstimator.KL
    adaptive_kl: bool = True
    init_kl_coef: float = 0.2
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    whiten_advantages: bool = True
    score_scale: float = 1.0
    score_norm: bool = False  # divide scores by their running std
    score_baseline: bool = False  # subtract the running mean score
    samples_per_prompt: int = 1  # responses sampled per prompt; rollout_batch counts responses
    group_baseline: bool = False  # subtract the mean score of the prompt's other responses (RLOO); needs >= 2
    score_clip: float = 0.0  # 0: no clipping
    missing_eos_penalty: float = 0.0  # subtracted from the score of responses with no EOS
    value_dropout: float = 0.1
    value_detach: bool = False  # train the value head on detached hidden states: the policy's LoRA weights then
    # get only the policy gradient (the shared-trunk value loss can pull a small model's answers around)
    use_value: bool = True  # false: no value function; each token's advantage is its return (score + KL penalties
    # to the end, discounted by gamma; lam unused): REINFORCE, or RLOO with group_baseline


@dataclass
class GenSection:
    min_new_tokens: int = 32  # response length drawn uniformly in [min, max] per rollout
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_prompt_length: int = 256


@dataclass
class RewardSource:
    function: str = "minitune.data.synthetic:correctness_reward"  # module:function(responses, references)
    adapter: str = ""  # a reward adapter folder from recipes/reward_model.py (used instead of the function)


@dataclass
class PPOConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoRASection = field(default_factory=LoRASection)
    # CPU default: a pool of 32 training prompts, 8 per step x 4 samples, so every prompt comes back every 4 steps
    # and the reward curve compares the same prompts; each score minus its prompt's other answers' mean (RLOO),
    # no value function (one small head cannot predict per-prompt success from 32 rollouts a step), one epoch
    data: DataSection = field(default_factory=lambda: DataSection(synthetic_train=32, synthetic_eval=64))
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-4, warmup_steps=0, schedule="constant"))
    run: RunSection = field(default_factory=lambda: RunSection(output_dir="outputs/ppo", max_steps=16, save_every=8))
    wandb: WandbSection = field(default_factory=WandbSection)
    ppo: PPOSection = field(default_factory=lambda: PPOSection(
        rollout_batch=32, samples_per_prompt=4, group_baseline=True, use_value=False, mini_batch=16, ppo_epochs=1,
        adaptive_kl=False, init_kl_coef=0.05))
    # Every synthetic answer fits in 32 tokens with its EOS (sort/reverse need up to 23): a shorter draw
    # would cut correct answers off and score them wrong, teaching the policy away from them.
    gen: GenSection = field(default_factory=lambda: GenSection(min_new_tokens=32, max_new_tokens=32, max_prompt_length=96))
    reward: RewardSource = field(default_factory=RewardSource)
    init_adapter: str = "auto"  # SFT adapter to start from; "auto": outputs/lora_sft/adapter if present; "": none
    sample_every: int = 4
    eval_accuracy: bool = True  # synthetic task: greedy exact-match accuracy on held-out prompts before/after
    eval_max_new_tokens: int = 32  # answer budget of that greedy evaluation (SFT's default too)


class ValueHead(nn.Module):
    """dropout + Linear(hidden, 1) per token on the policy's last hidden state (TRL's value head)."""

    def __init__(self, hidden: int, dropout: float, device=None):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.summary = nn.Linear(hidden, 1, device=device)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.summary(self.dropout(h.float())).squeeze(-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"v_head.summary.weight": self.summary.weight, "v_head.summary.bias": self.summary.bias}

    def load(self, t: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.summary.weight.copy_(t["v_head.summary.weight"])
            self.summary.bias.copy_(t["v_head.summary.bias"])


@dataclass
class RunningMoments:
    """Running mean/std of scores (for baseline subtraction and normalization)."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 1e-8

    def update(self, x: torch.Tensor) -> None:
        n, m, v = x.numel(), x.mean().item(), x.var(unbiased=False).item() if x.numel() > 1 else 0.0
        total = self.count + n
        delta = m - self.mean
        self.mean += delta * n / total
        self.var = (self.var * self.count + v * n + delta ** 2 * self.count * n / total) / total
        self.count = total


# ----------------------------------------------------------------------------------------------


def load_prompts(cfg: PPOConfig) -> tuple[list[str], list]:
    d = cfg.data
    if d.source == "synthetic":
        train, _ = train_eval_split(d.synthetic_train, d.synthetic_eval, seed=cfg.run.seed)
        return [ex["prompt"] for ex in train], [ex["answer"] for ex in train]
    if d.hh_format:
        rows = load_rows(d.source, columns=[d.chosen_column, d.rejected_column])
        prompts = [split_hh(r[d.chosen_column], r[d.rejected_column]).prompt for r in rows]
    else:
        rows = load_rows(d.source, columns=[d.prompt_column])
        prompts = list(rows[d.prompt_column])
    if d.max_rows:
        prompts = prompts[: d.max_rows]
    refs = list(rows["reference"])[: len(prompts)] if "reference" in rows.column_names else [None] * len(prompts)
    return prompts, refs


def resolve_reward_fn(spec: str):
    mod_name, _, fn_name = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise MinituneError(f"reward.function {spec!r} cannot be imported: {e}") from None


def policy_forward(model, head: ValueHead, seq, mask, P: int, temperature: float, *, with_entropy=False,
                   detach_values=False):
    """Log-probs [B, R], values [B, R] (and entropy) of the response part of `seq` [B, P+R]."""
    out = model(seq, positions_from_mask(mask), mask, logits_from=P - 1)  # no logits over the prompt
    logits = out.logits[:, :-1]  # position t predicts token t+1: positions P-1 .. P+R-2
    logp = logprobs_from_logits(logits, seq[:, P:], temperature)
    hidden = out.hidden[:, P - 1: -1]
    values = head(hidden.detach() if detach_values else hidden)
    ent = entropy_from_logits(logits, temperature) if with_entropy else None
    return logp, values, ent, logits


def scores_for(cfg, model, reward_head, reward_fn, tok, texts, refs, seq, mask, ended, moments: RunningMoments, device):
    """Sequence scores [B]: reward adapter or function, then baseline / normalization / clip / penalty."""
    if reward_head is not None:
        with use_adapter(model, "reward"):
            raw = sequence_rewards(model, reward_head, seq, mask).float()
    else:
        try:
            out = reward_fn(texts, refs)
        except Exception as e:
            raise MinituneError(f"reward function {cfg.reward.function} raised {type(e).__name__}: {e}") from None
        raw = check_scores(out, len(texts), cfg.reward.function).to(device)
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
    if cfg.ppo.missing_eos_penalty:
        s = s - cfg.ppo.missing_eos_penalty * (~ended).float()
    return s, raw


def check_config(cfg: PPOConfig) -> None:
    k = cfg.ppo.samples_per_prompt
    if k < 1 or cfg.ppo.rollout_batch % k:
        raise MinituneError(f"ppo.rollout_batch ({cfg.ppo.rollout_batch}) must be a multiple of "
                            f"ppo.samples_per_prompt ({k}): it counts responses, {k} per prompt")
    if cfg.ppo.group_baseline and k < 2:
        raise MinituneError("ppo.group_baseline compares a prompt's responses with each other: set "
                            "ppo.samples_per_prompt to 2 or more, or group_baseline=false")


def train(cfg: PPOConfig) -> dict:
    check_config(cfg)
    # 0. Set-up: process group, output folder, resume point, the one shared base.
    device = cfg.run.resolved_device()
    info = init_distributed(device)
    device = info.device
    seed_everything(cfg.run.seed)
    out_dir, resume = prepare_output(cfg, cfg.run, info)
    tok = load_tokenizer(model_path(cfg.model.path))
    log = MetricsLogger(out_dir, cfg.wandb, to_dict(cfg), enabled=info.is_main)
    base = build_base(cfg.model, device)
    init = cfg.init_adapter
    if init == "auto":
        init = "outputs/lora_sft/adapter" if Path("outputs/lora_sft/adapter/adapter_config.json").exists() else ""
    if init:
        load_adapter(base, init, "reference", trainable=False)
        load_adapter(base, init, "policy", trainable=True)
        for p in base.parameters():
            p.requires_grad_(False)
        for name, p in base.named_parameters():
            if ".adapters.policy." in name:
                p.requires_grad_(True)
    else:
        apply_lora(base, cfg.lora.lora_config(), "policy")
    reference = (lambda: use_adapter(base, "reference")) if init else (lambda: disable_adapters(base))
    reward_head = load_reward_adapter(base, cfg.reward.adapter, "reward") if cfg.reward.adapter else None
    reward_fn = None if reward_head is not None else resolve_reward_fn(cfg.reward.function)
    value_head = ValueHead(base.config.hidden_size, cfg.ppo.value_dropout, device=device)
    if resume is not None:
        value_head.load(restore_adapter(base, resume, "policy"))
    set_adapter(base, "policy")
    base_bytes = base_parameter_bytes(base)
    model = finish_model(base, cfg.model, cfg.run, info)
    seed_everything(cfg.run.seed + info.rank)
    if info.is_main:
        print(f"policy starts from {init or 'a fresh adapter'}; reference = {'adapter copy' if init else 'base'}; "
              f"reward = {cfg.reward.adapter or cfg.reward.function}")

    prompts, refs = load_prompts(cfg)
    mine = list(range(info.rank, len(prompts), info.world_size))
    opt = build_optimizer(list(model.parameters()) + list(value_head.parameters()), cfg.optim)
    kl_ctl = (AdaptiveKLController(cfg.ppo.init_kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon) if cfg.ppo.adaptive_kl
              else FixedKLController(cfg.ppo.init_kl_coef))
    moments = RunningMoments()
    step, cursor = 0, 0
    if resume is not None:
        step, data_state, extras = restore_state(resume, opt, None, info)
        cursor = data_state["cursor"]
        kl_ctl.load_state_dict(extras["kl_ctl"])
        moments = RunningMoments(**extras["moments"])
    mgr = CheckpointManager(out_dir, cfg.run.keep_last)
    last_ckpt, history = resume, []
    rng = random.Random(cfg.run.seed + 7919 * info.rank + step)
    bar = progress_bar(cfg.run.max_steps, step, info, cfg.run, "ppo")
    policy = unwrap(model)
    held_out = train_eval_split(cfg.data.synthetic_train, cfg.data.synthetic_eval, seed=cfg.run.seed)[1] \
        if cfg.data.source == "synthetic" and cfg.eval_accuracy else None

    def held_out_accuracy(when: str, at_step: int) -> float:
        acc = greedy_accuracy(policy, tok, held_out, max_new_tokens=cfg.eval_max_new_tokens, device=device)[0]
        if info.is_main:
            print(f"held-out greedy exact-match accuracy {when} PPO: {acc:.3f}")
            log.log(at_step, eval_accuracy=acc)
        return acc

    before = held_out_accuracy("before", 0) if held_out and step == 0 else None
    with StopSignal() as stop:
        while step < cfg.run.max_steps:
            # 1. Rollout: sample prompts, generate with the policy (KV cache, no grad, eval mode).
            t0 = time.perf_counter()
            k = cfg.ppo.samples_per_prompt
            picked = [mine[(cursor + i) % len(mine)] for i in range(cfg.ppo.rollout_batch // k)]
            cursor += len(picked)
            idx = [i for i in picked for _ in range(k)]  # k responses per prompt, grouped
            texts = [prompts[i] for i in idx]
            ids, truncated = encode_prompts([prompts[i] for i in picked], tok, max_length=cfg.gen.max_prompt_length,
                                            chat=cfg.data.template.value == "chat", system=SYSTEM if cfg.data.source == "synthetic" else None)
            q, qmask = left_pad(ids, tok.pad_id, device)
            policy.eval()
            value_head.eval()
            n_new = rng.randint(cfg.gen.min_new_tokens, cfg.gen.max_new_tokens)
            g = torch.Generator(device=device).manual_seed(rng.randrange(2**31))
            gen = generate(policy, q, qmask, max_new_tokens=n_new, eos_ids=tok.eos_ids, pad_id=tok.pad_id,
                           temperature=cfg.gen.temperature, top_k=cfg.gen.top_k, top_p=cfg.gen.top_p, generator=g,
                           num_samples=k)  # one prefill per prompt, its cache copied k times
            q, qmask = q.repeat_interleave(k, 0), qmask.repeat_interleave(k, 0)
            t_gen = time.perf_counter() - t0
            P = q.shape[1]
            rmask = gen.mask.float()
            seq = gen.sequences
            mask = torch.cat([qmask, gen.mask], 1)
            responses = [tok.decode(t[: int(n)]) for t, n in zip(gen.tokens, gen.lengths)]

            with torch.no_grad():
                # 2. Score the responses.
                scores, raw = scores_for(cfg, policy, reward_head, reward_fn, tok, responses, [refs[i] for i in idx],
                                         seq, mask, gen.ended, moments, device)
                # 3. Log-probs under policy and reference, values from the value head.
                logp, values, _, logits = policy_forward(policy, value_head, seq, mask, P, cfg.gen.temperature)
                with reference():
                    ref_out = policy(seq, positions_from_mask(mask), mask, logits_from=P - 1)
                ref_logits = ref_out.logits[:, :-1]
                ref_logp = logprobs_from_logits(ref_logits, gen.tokens, cfg.gen.temperature)
                # 4. Per-token rewards: -kl_coef * kl_t, the score on the last generated token.
                kl = kl_per_token(logp, ref_logp, cfg.ppo.kl_estimator, logits / max(cfg.gen.temperature, 1e-6),
                                  ref_logits / max(cfg.gen.temperature, 1e-6)) * rmask
                rewards, non_score = per_token_rewards(scores, kl, rmask, kl_ctl.value)
                # 5. GAE advantages and returns (without a value function: the return itself); masked whitening.
                if not cfg.ppo.use_value:
                    values = torch.zeros_like(values)
                adv, returns = gae(rewards, values, rmask, cfg.ppo.gamma, cfg.ppo.lam if cfg.ppo.use_value else 1.0)
                if cfg.ppo.whiten_advantages:
                    adv = whiten(adv, rmask)
            traj = Trajectory(q, qmask, gen.tokens, rmask, logp, ref_logp, values, scores, kl)
            del logits, ref_logits, ref_out

            # 6. PPO epochs over shuffled minibatches: clipped policy and value losses.
            t1 = time.perf_counter()
            policy.train()
            value_head.train()
            mb_stats, skipped = [], 0
            B = len(idx)
            for _ in range(cfg.ppo.ppo_epochs):
                order = torch.randperm(B, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
                for s in range(0, B, cfg.ppo.mini_batch):
                    mb = order[s: s + cfg.ppo.mini_batch].to(device)
                    new_logp, new_values, ent, _ = policy_forward(model, value_head, seq[mb], mask[mb], P,
                                                                  cfg.gen.temperature, with_entropy=True,
                                                                  detach_values=cfg.ppo.value_detach)
                    pg_loss, vf_loss, st = ppo_losses(new_logp, traj.logprobs[mb], new_values, traj.values[mb], adv[mb],
                                                      returns[mb], rmask[mb], cliprange=cfg.ppo.cliprange,
                                                      cliprange_value=cfg.ppo.cliprange_value, entropy=ent)
                    if st.ratio_mean.item() > cfg.ppo.ratio_threshold:
                        skipped += 1  # a stale or broken minibatch: its update would be huge
                        opt.zero_grad(set_to_none=True)
                        continue
                    loss = pg_loss + cfg.ppo.vf_coef * vf_loss if cfg.ppo.use_value else pg_loss
                    loss.backward()
                    if info.world_size > 1:
                        for p in value_head.parameters():
                            all_reduce_sum(p.grad).div_(info.world_size)
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        [p for p in list(model.parameters()) + list(value_head.parameters()) if p.requires_grad],
                        cfg.optim.grad_clip)
                    check_finite(step + 1, last_ckpt, loss=loss.item(), gradient_norm=float(grad_norm))
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    mb_stats.append(st)
            t_train = time.perf_counter() - t1

            # 7. KL controller, stats, samples, checkpoint.
            seq_kl = (kl * rmask).sum(1)
            kl_mean = all_reduce_sum(seq_kl.mean().clone()).item() / info.world_size
            kl_ctl.update(kl_mean, B * info.world_size)
            step += 1
            mean = lambda name: torch.stack([getattr(s, name) for s in mb_stats]).mean().item() if mb_stats else float("nan")  # noqa: E731
            acc = sum(is_correct(r, refs[i]) for r, i in zip(responses, idx)) / B if refs[idx[0]] is not None else None
            stats = {
                "score_mean": raw.mean().item(), "score_std": raw.std().item() if B > 1 else 0.0,
                "non_score_reward": (non_score.sum(1)).mean().item(), "kl": kl_mean, "kl_coef": kl_ctl.value,
                "entropy": mean("entropy"), "pg_loss": mean("pg_loss"), "vf_loss": mean("vf_loss"),
                "pg_clipfrac": mean("pg_clipfrac"), "vf_clipfrac": mean("vf_clipfrac"), "approx_kl": mean("approx_kl"),
                "ratio_mean": mean("ratio_mean"), "skipped_minibatches": skipped,
                "explained_variance": explained_variance(values, returns, rmask),
                "response_length": gen.lengths.float().mean().item(), "diversity": response_diversity(responses),
                "no_eos_share": 1.0 - gen.ended.float().mean().item(),  # cut off by the length budget
                # where the step's time goes: rollout generation, scoring (reward, policy/reference
                # log-probs, values, advantages), PPO update
                "gen_s": t_gen, "score_s": t1 - t0 - t_gen, "update_s": t_train,
                **{f"{k}_share": v / (t1 - t0 + t_train) for k, v in
                   (("gen", t_gen), ("score", t1 - t0 - t_gen), ("update", t_train))},
                "gen_tokens_per_s": float(gen.lengths.sum()) / t_gen,
                "train_tokens_per_s": cfg.ppo.ppo_epochs * float(mask.sum()) / max(t_train, 1e-6),
                "prompts_truncated": truncated,
            }
            if acc is not None:
                stats["accuracy"] = acc
            history.append(stats)
            if info.is_main:
                log.log(step, **stats)
                if cfg.sample_every and step % cfg.sample_every == 0:
                    for t, r, sc in list(zip(texts, responses, raw.tolist()))[:2]:
                        print(f"\n[step {step}] prompt: {t[:100]!r}\n  response: {r[:160]!r}\n  score: {sc:.3f}")
            bar.set_postfix(score=f"{stats['score_mean']:.3f}", kl=f"{kl_mean:.3f}")
            bar.update(1)
            stopping = stop.requested is not None
            if should_save(cfg.run, step, cfg.run.max_steps, stopping):
                last_ckpt = save_state(mgr, step, model, adapter="policy", optimizer=opt, scheduler=None,
                                       data_state={"cursor": cursor}, info=info, head_tensors=value_head.tensors(),
                                       base_name=cfg.model.path,
                                       extras={"kl_ctl": kl_ctl.state_dict(), "moments": vars(moments)})
            if stopping:
                report_stop(stop.requested, step, last_ckpt, info.is_main)
                break
    bar.close()
    summary = {"steps": step, "last_checkpoint": str(last_ckpt), "base_param_bytes": base_bytes}
    if held_out:
        summary["eval_accuracy_before"] = before
        summary["eval_accuracy_after"] = held_out_accuracy("after", step)
    summary["history"] = history
    if info.is_main:
        write_summary(out_dir, summary)
    log.close()
    cleanup(model)
    return summary


def main(argv=None) -> int:
    return run_recipe(PPOConfig, train, argv)


if __name__ == "__main__":
    sys.exit(main())
