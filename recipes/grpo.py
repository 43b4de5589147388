"""GRPO: group-relative policy optimization on one shared frozen base, no value function.

    python recipes/grpo.py                                  # embedded default: synthetic task, from the SFT adapter
    python recipes/grpo.py grpo.beta=0.04 grpo.scale_advantages=false
    torchrun --nproc_per_node 8 recipes/grpo.py run.parallel=ddp

Each step: G answers to each of a batch of prompts from one prefill per prompt; each answer's
advantage is its score against the other answers to the same prompt; groups whose answers all
score alike are skipped (no signal); the clipped surrogate (+ beta * k3 KL to the reference) is
averaged over response tokens. The policy is LoRA adapter "policy"; the reference (only run when
beta > 0) is the start adapter frozen, or the bare base.
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field

import torch

from minitune.data.synthetic import is_correct
from minitune.distributed import all_reduce_sum, metrics_over_ranks, std_over_ranks, unwrap, world_size
from minitune.errors import MinituneError, require
from minitune.grpo import (Aggregation, global_counts, global_token_means, group_advantages, grpo_loss, informative_groups,
                           rows_to_guide)
from minitune.lora import LoRAConfig, set_adapter
from minitune.reward import load_reward_adapter
from minitune.rl_eval import HeldOutEval
from minitune.ppo import policy_forward
from minitune.rollout import (Rollout, answer_penalties, check_reward_adapter, demonstration_nll, demonstrations,
                              empty_answers, load_prompts, prompts_system, prompts_use_chat, resolve_reward_fn,
                              sample_rollout, score_rollout, score_with_function, with_answers)
from minitune.train.checkpointing import CheckpointManager
from minitune.train.cli import report_stop, run_recipe, should_save
from minitune.train.sections import (DataSection, GenSection, HeldOutSection, ModelSection, OptimSection,
                                     RewardSource, RunSection, WandbSection)
from minitune.train.setup import (attach_policy, build_base, finish_model, finish_run, progress_bar,
                                  resolve_init_adapter, restore_adapter, restore_state, save_state, start_run)
from minitune.train.control import StopSignal, check_finite
from minitune.train.optim import build_optimizer, lr_lambda
from minitune.train.rng import seed_everything


@dataclass
class GRPOSection:
    rollout_batch: int = 128  # responses per rank per step: rollout_batch / group_size prompts
    group_size: int = 8  # G answers per prompt, from one prefill
    scale_advantages: bool = True  # (s - mean) / (std + eps); false: s - mean (Dr. GRPO)
    # weight of the below-mean answers' advantages: 1 pushes them down (GRPO); 0 reinforces only the answers better
    # than their group's mean (rejection-sampling fine-tuning on the policy's own answers: RAFT, ReST, STaR)
    negative_weight: float = 1.0
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.28  # DAPO's clip-higher: room for unlikely tokens to grow
    beta: float = 0.0  # weight of the k3 KL to the reference; 0 skips the reference forward
    aggregation: Aggregation = Aggregation.TOKEN  # token: mean over all response tokens (DAPO); sequence: per answer
    epochs: int = 1  # passes over each rollout
    mini_batches: int = 1  # optimizer steps per pass; > 1 (or epochs > 1) makes the clipping matter
    micro_batch: int = 16  # answers per forward/backward, whole groups (memory only: the gradient is the same)
    skip_equal_groups: bool = True  # drop groups whose answers all scored alike before the update forward
    # a group none of whose answers scores as well as the prompt's reference answer gets the reference in place of
    # its worst answer (off-policy guidance, LUFFY): prompts the policy never samples right still teach it.
    # Needs reference answers (the synthetic task, or a `reference` column) and a reward function
    guide: bool = False
    # weight of a supervised term: the mean negative log-likelihood of each step's prompts' reference answers,
    # added to every optimizer step's loss (InstructGPT's PPO-ptx, on the SFT data rather than pre-training text):
    # prompts the policy never answers right still teach it, and right answers it already gives are kept.
    # Needs reference answers (the synthetic task, or a `reference` column); 0: pure GRPO
    sft_coef: float = 0.0

    def __post_init__(self):
        require(self.group_size >= 2, "group_size", self.group_size, "must be >= 2: GRPO compares a prompt's answers")
        require(self.rollout_batch >= self.group_size and self.rollout_batch % self.group_size == 0, "rollout_batch",
                self.rollout_batch, f"must be a multiple of group_size ({self.group_size}): it counts responses, "
                f"group_size per prompt")
        require(0 <= self.clip_low < 1, "clip_low", self.clip_low, "must be in [0, 1)")
        require(self.clip_high >= 0, "clip_high", self.clip_high, "must be >= 0")
        require(self.beta >= 0, "beta", self.beta, "must be >= 0 (0: no KL term)")
        require(self.sft_coef >= 0 and self.sft_coef < float("inf"), "sft_coef", self.sft_coef,
                "must be >= 0 and finite (0: no supervised term)")
        require(0 <= self.negative_weight <= 1, "negative_weight", self.negative_weight,
                "must be in [0, 1] (1: GRPO, 0: only better-than-mean answers reinforced)")
        for name in ("epochs", "mini_batches", "micro_batch"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")

    @property
    def prompts_per_step(self) -> int:
        return self.rollout_batch // self.group_size


@dataclass
class GRPOConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # used only without init_adapter
    # Prompts: the synthetic task's training split (the SFT default's 2,000 prompts); held out: 200
    # prompts that neither SFT nor GRPO trains on.
    data: DataSection = field(default_factory=lambda: DataSection(synthetic_train=2000, synthetic_eval=200))
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-4, warmup_steps=0, schedule="constant"))
    run: RunSection = field(default_factory=lambda: RunSection(output_dir="outputs/grpo", max_steps=20, save_every=10,
                                                               eval_every=10))
    wandb: WandbSection = field(default_factory=WandbSection)
    # CPU default (README): 32 prompts x 8 answers a step, mean-only advantages (Dr. GRPO), k3 KL 0.04 to the
    # start adapter, lr 1e-4, the greedy answer first in each group: held-out 0.630 -> 0.690 in 20 steps (17
    # prompts gained, 5 lost; without the greedy member 0.660); without the KL term the gain faded by step 30
    # (0.665 -> 0.645); lr 2e-4 fell to 0.580 by step 6.
    grpo: GRPOSection = field(default_factory=lambda: GRPOSection(rollout_batch=256, scale_advantages=False, beta=0.04,
                                                                  micro_batch=64))
    # GenSection.synthetic: 32 new tokens, every answer fits (tests/test_ppo.py). Temperature 0.7: a
    # prompt the greedy answer gets right then mostly gives a group of equal scores (skipped, free),
    # and the groups that carry signal are those near the greedy answer; at 1.0 held-out exact-match
    # fell (0.630 -> 0.590 in 20 steps at lr 5e-5), at 0.7 it rose (-> 0.645). The greedy member: the answer the
    # held-out check scores is itself pushed down where it is wrong and a sample is right (and up where it is right).
    gen: GenSection = field(default_factory=lambda: GenSection.synthetic(temperature=0.7, greedy_member=True))
    reward: RewardSource = field(default_factory=RewardSource)
    init_adapter: str = "auto"  # adapter to start from (and reference); "auto": the SFT default's if present; "": none
    held_out: HeldOutSection = field(default_factory=HeldOutSection)  # 200 prompts never trained on, greedy


def micro_batches(groups: list[int], G: int, answers: int) -> list[list[int]]:
    """Consecutive groups, at most `answers` answers per forward (at least one group)."""
    per = max(1, answers // G)
    return [groups[s: s + per] for s in range(0, len(groups), per)]


def rows_of(groups: list[int], G: int, device) -> torch.Tensor:
    return torch.tensor([g * G + j for g in groups for j in range(G)], dtype=torch.long, device=device)


def answer_logprobs(model, ro: Rollout, rows: torch.Tensor, G: int, temperature: float) -> torch.Tensor:
    """[len(rows), N] log-probs of the answers in `rows` (whole groups), each prompt computed once
    for its G answers (`minitune.ppo.policy_forward`)."""
    return policy_forward(model, ro.gen.sequences[rows], ro.attention_mask[rows], ro.gen.mask[rows], G, temperature,
                          values=False)[0]


def update(model, ro: Rollout, advantages: torch.Tensor, groups: list[int], row_weight: torch.Tensor, ref_logp,
           old_logp, cfg: GRPOConfig, opt, sched, rng: random.Random, step: int, last_ckpt,
           demo: Rollout | None = None) -> dict:
    """The optimizer steps of one rollout: epochs x mini_batches steps over `groups` (shuffled whole),
    each summing the gradients of its micro-batches; a micro-batch is whole groups, each prompt
    computed once for its G answers (`answer_logprobs`). Rows of weight 0 are computed but count
    nowhere (ranks that must run as many forwards as the others). With `demo` (reference answers),
    each optimizer step adds `sft_coef` x their mean NLL, and steps even when no group carries
    signal. Returns the mean of the update statistics."""
    g, G, T = cfg.grpo, cfg.grpo.group_size, cfg.gen.temperature
    rmask = ro.gen.mask.float() * row_weight[:, None]
    stats, tokens_of, norms, nlls = [], [], [], []
    for _ in range(g.epochs):
        perm = torch.randperm(len(groups), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        order = [groups[i] for i in perm]
        per = max(1, -(-len(order) // g.mini_batches))
        for chunk in [order[s: s + per] for s in range(0, len(order), per)] or [[]]:
            idx = rows_of(chunk, G, rmask.device)
            tokens, n_seq = global_counts(rmask[idx], row_weight[idx])  # the global minibatch's, per rank
            losses = []
            for micro in micro_batches(chunk, G, g.micro_batch):
                mb = rows_of(micro, G, rmask.device)
                R = max(int(ro.gen.lengths[mb].max()), 1)  # trim the padding every row of the micro-batch has
                logp = answer_logprobs(model, ro, mb, G, T)[:, :R]
                loss, st = grpo_loss(logp, old_logp[mb, :R] if old_logp is not None else logp.detach(), advantages[mb],
                                     rmask[mb, :R], clip_low=g.clip_low, clip_high=g.clip_high, beta=g.beta,
                                     ref_logp=ref_logp[mb, :R] if ref_logp is not None else None,
                                     aggregation=g.aggregation, total_tokens=tokens, total_sequences=n_seq)
                loss.backward()
                stats.append(st)
                tokens_of.append(rmask[mb, :R].sum())
                losses.append(st.loss)
            if demo is not None:
                nll = demonstration_nll(model, demo)
                (g.sft_coef * nll).backward()
                nlls.append(nll.detach().item())
                losses.append(g.sft_coef * nll.detach())
            norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip)
            check_finite(step + 1, last_ckpt, loss=float(sum(losses)), gradient_norm=float(norm))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            norms.append(float(norm))
    sft = {"sft_nll": sum(nlls) / len(nlls)} if nlls else {}
    if not stats:
        return {**sft, **({"grad_norm": sum(norms) / len(norms)} if norms else {})}
    # each rank's loss is its share of the global minibatch's (`global_counts`): their mean is that loss
    loss = all_reduce_sum(torch.stack([s.loss for s in stats]).sum() / (g.epochs * g.mini_batches)).item() / world_size()
    return {"loss": loss, **global_token_means(stats, tokens_of), "grad_norm": sum(norms) / len(norms), **sft}


@torch.no_grad()
def logprobs_of(model, ro: Rollout, groups: list[int], cfg: GRPOConfig) -> torch.Tensor:
    """[B, R] response log-probs (eval mode, no grad) of the given groups' rows; zeros elsewhere."""
    G = cfg.grpo.group_size
    out = torch.zeros_like(ro.gen.mask, dtype=torch.float32)
    for micro in micro_batches(groups, G, cfg.grpo.micro_batch):
        rows = rows_of(micro, G, out.device)
        out[rows] = answer_logprobs(model, ro, rows, G, cfg.gen.temperature)
    return out


def train(cfg: GRPOConfig) -> dict:
    # 1. Set-up: the start adapter (checked before anything loads), process group, output folder.
    init = resolve_init_adapter(cfg.init_adapter, cfg.model.path)
    reward_fn = None if cfg.reward.adapter else resolve_reward_fn(cfg.reward.function)
    if cfg.reward.adapter:
        require(not cfg.grpo.guide, "grpo.guide", True, "scores reference answers with the reward function: "
                "use reward.function, not reward.adapter, or set grpo.guide=false")
        check_reward_adapter(cfg.data, cfg.reward.adapter)
    ctx = start_run(cfg)
    info, device, out_dir, resume, tok, log, _ = ctx
    split = load_prompts(cfg.data, cfg.run.seed, tok)
    prompts, refs = split.prompts, split.references
    if cfg.grpo.sft_coef and any(r is None for r in refs):
        raise MinituneError("grpo.sft_coef learns the prompts' reference answers, but these prompts have none: "
                            "use data with a `reference` column (or the synthetic task), or set grpo.sft_coef=0")
    if cfg.grpo.guide and any(r is None for r in refs):
        raise MinituneError("grpo.guide puts a prompt's reference answer into its group, but these prompts have none: "
                            "use data with a `reference` column (or the synthetic task), or set grpo.guide=false")
    order = list(range(len(prompts)))
    random.Random(cfg.run.seed).shuffle(order)
    mine = order[info.rank::info.world_size]
    if len(mine) < cfg.grpo.prompts_per_step:
        raise MinituneError(f"only {len(mine)} prompts per rank for {cfg.grpo.prompts_per_step} prompts a step; "
                            "lower grpo.rollout_batch or add prompts")

    # 2. Model: one frozen base, the policy adapter, the reference (and a reward adapter if configured).
    seed_everything(cfg.run.seed)
    base = build_base(cfg.model, device)
    reference = attach_policy(base, init, cfg.lora)
    reward_head = load_reward_adapter(base, cfg.reward.adapter, "reward") if cfg.reward.adapter else None
    if resume is not None:
        restore_adapter(base, resume, "policy")
    set_adapter(base, "policy")
    model = finish_model(base, cfg.model, cfg.run, info)
    policy = unwrap(model)
    seed_everything(cfg.run.seed + info.rank)
    if info.is_main:
        print(f"policy starts from {init or 'a fresh adapter'}; {cfg.grpo.prompts_per_step} prompts x "
              f"{cfg.grpo.group_size} answers a step; reward = {cfg.reward.adapter or cfg.reward.function}; "
              f"KL weight {cfg.grpo.beta:g}")

    # 3. Optimizer, resume point, held-out evaluation.
    opt = build_optimizer(model.parameters(), cfg.optim)
    steps_per_rollout = cfg.grpo.epochs * cfg.grpo.mini_batches
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim, cfg.run.max_steps * steps_per_rollout))
    step, cursor = 0, 0
    if resume is not None:
        step, data_state, _ = restore_state(resume, opt, sched, info)
        cursor = data_state["cursor"]
    mgr = CheckpointManager(out_dir, cfg.run.keep_last)
    last_ckpt, history = resume, []
    held_out = HeldOutEval(policy, tok, split, cfg, reward_head=reward_head, reward_fn=reward_fn, out_dir=out_dir,
                           log=log, is_main=info.is_main, device=device, reference=reference)

    t_start = time.perf_counter()
    if held_out and step == 0:
        held_out(0)
    bar = progress_bar(cfg.run.max_steps, step, info, cfg.run, "grpo")
    chat, system = prompts_use_chat(cfg.data), prompts_system(cfg.data)
    G = cfg.grpo.group_size
    with StopSignal() as stop:
        while step < cfg.run.max_steps:
            # 4. Rollout: G answers per prompt, scored; advantages within each group.
            rng = random.Random(cfg.run.seed + 7919 * info.rank + step)  # a step's sampling depends on the step only
            picked = [mine[(cursor + i) % len(mine)] for i in range(cfg.grpo.prompts_per_step)]
            cursor += len(picked)
            ro = sample_rollout(policy, tok, [prompts[i] for i in picked], [refs[i] for i in picked], gen=cfg.gen, k=G,
                                rng=rng, chat=chat, system=system, device=device)
            t1 = time.perf_counter()
            raw = score_rollout(ro, policy, reward_head=reward_head, reward_fn=reward_fn, name=cfg.reward.function,
                                device=device)
            scores = raw - answer_penalties(ro, cfg.reward).to(raw.device)  # cut off or empty answers, if set
            sampled, guided = ro, []
            demo = demonstrations(ro, G, tok) if cfg.grpo.sft_coef else None
            if cfg.grpo.guide:  # the reference answer in place of the worst answer of groups with none as good
                ref_scores = score_with_function(reward_fn, cfg.reward.function, ro.references[::G], ro.references[::G],
                                                 device)
                guided = rows_to_guide(scores, ref_scores, G)
                ro = with_answers(ro, {b: ro.references[b] for b in guided}, tok)
                scores = scores.clone()
                scores[guided] = ref_scores[[b // G for b in guided]]
            adv = group_advantages(scores, G, scale=cfg.grpo.scale_advantages,
                                   negative_weight=cfg.grpo.negative_weight)
            keep = informative_groups(scores, G) if cfg.grpo.skip_equal_groups else torch.ones(len(picked), dtype=torch.bool)
            row_weight = keep.repeat_interleave(G).float().to(device)
            if info.world_size > 1:  # every rank runs the same number of forwards: skipped groups stay, weightless
                groups = list(range(len(picked)))
            else:
                groups = [i for i in range(len(picked)) if keep[i]]
            # 5. Reference log-probs (only with a KL term) and the rollout policy's (only when it moves within a rollout).
            policy.eval()
            ref_logp = None
            if cfg.grpo.beta:
                with reference():
                    ref_logp = logprobs_of(policy, ro, groups, cfg)
            old_logp = logprobs_of(policy, ro, groups, cfg) if steps_per_rollout > 1 else None
            # 6. Update: clipped surrogate (+ KL), token-mean, grad clip, finite check, optimizer step(s).
            t2 = time.perf_counter()
            model.train()
            up = update(model, ro, adv.to(device), groups, row_weight, ref_logp, old_logp, cfg, opt, sched, rng, step,
                        last_ckpt, demo) if groups or demo is not None else {}
            t3 = time.perf_counter()
            step += 1

            # 7. Metrics, samples, held-out evaluation, checkpoint.
            ro, n = sampled, len(sampled.responses)  # statistics of what the policy sampled
            stats = {"score_mean": raw.mean().item(), "informative_groups": keep.float().mean().item(), **up,
                     **({"guided_groups": len(guided) / len(picked)} if cfg.grpo.guide else {}),
                     "response_length": ro.gen.lengths.float().mean().item(),
                     "no_eos_share": 1.0 - ro.gen.ended.float().mean().item(),
                     "empty_share": empty_answers(ro.responses).float().mean().item(),
                     "stop_share": ro.stopped.float().mean().item(), "lr": sched.get_last_lr()[0],
                     "gen_s": ro.seconds, "score_s": t2 - t1, "update_s": t3 - t2,
                     "gen_tokens_per_s": float(ro.gen.lengths.sum()) / ro.seconds, "prompts_truncated": ro.truncated}
            if ro.references[0] is not None:
                stats["accuracy"] = sum(is_correct(r, ref) for r, ref in zip(ro.responses, ro.references)) / n
            # the whole job's figures under torchrun: means over the ranks' equal rollouts, the slowest rank's times
            stats = {**metrics_over_ranks(stats, device, summed=("gen_tokens_per_s", "prompts_truncated"),
                                          largest=("gen_s", "score_s", "update_s")),
                     "score_std": std_over_ranks(raw), "updated": bool(groups) or demo is not None}
            history.append(stats)
            if info.is_main:
                log.log(step, **stats)
            bar.set_postfix(score=f"{stats['score_mean']:.3f}", groups=f"{stats['informative_groups']:.2f}")
            bar.update(1)
            if held_out and cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < cfg.run.max_steps:
                held_out(step)
            requested = stop.anywhere(device)  # every rank stops after the same step
            stopping = requested is not None
            if should_save(cfg.run, step, cfg.run.max_steps, stopping):
                last_ckpt = save_state(mgr, step, model, adapter="policy", optimizer=opt, scheduler=sched,
                                       data_state={"cursor": cursor}, info=info, base_name=cfg.model.path)
            if stopping:
                report_stop(requested, step, last_ckpt, info.is_main)
                break
    bar.close()

    # 8. Final held-out evaluation and the policy adapter.
    train_seconds = time.perf_counter() - t_start
    if held_out and step == cfg.run.max_steps:
        held_out(step)
    summary = {"steps": step, "last_checkpoint": str(last_ckpt), "start_adapter": str(init or ""),
               "seconds": round(train_seconds, 1), **held_out.summary(), "history": history}
    if info.is_main and (line := held_out.describe()):
        print(f"{line} in {train_seconds:.0f} s")
    finish_run(model, ctx, summary, adapter="policy", base_name=cfg.model.path, print_summary=False)
    return summary


def main(argv=None) -> int:
    return run_recipe(GRPOConfig, train, argv)


if __name__ == "__main__":
    sys.exit(main())
