"""Rollouts for the RL recipes (PPO, GRPO): load the prompt pool, sample answers to a batch of
prompts with the policy (k per prompt from one prefill), and score them."""
from __future__ import annotations

import importlib
import random
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

from minitune.data.loading import load_rows
from minitune.data.preference import hh_messages, split_hh
from minitune.data.prompts import encode_prompts, prompt_rendering
from minitune.data.synthetic import train_eval_split
from minitune.errors import MinituneError
from minitune.generate import GenerationOutput, generate, left_pad, positions_from_mask
from minitune.lora import use_adapter
from minitune.ppo import check_scores, logprobs_from_logits
from minitune.reward import RewardHead, check_rendering, sequence_rewards
from minitune.tokenizer import Tokenizer
from minitune.train.sections import GenSection


def load_prompts(d, seed: int, tok: Tokenizer | None = None) -> tuple[list[str], list]:
    """(prompts, reference answers or None) for rollouts from a DataSection: the synthetic task's
    training split (its held-out split is never returned; `max_rows` keeps its first rows), hh-rlhf
    dialogues cut before the last answer (with `data.hh_chat`, rendered through `tok`'s chat
    template), or a prompt column (with a "reference" column when the file has one)."""
    if d.source == "synthetic":
        train, _ = train_eval_split(d.synthetic_train, d.synthetic_eval, seed=seed)
        train = train[: d.max_rows] if d.max_rows else train  # a pool smaller than the split it comes from
        return [ex["prompt"] for ex in train], [ex["answer"] for ex in train]
    if d.hh_format:
        rows = load_rows(d.source, columns=[d.chosen_column, d.rejected_column])
        prompts = [split_hh(r[d.chosen_column], r[d.rejected_column]).prompt for r in rows]
        if d.hh_chat:
            prompts = [tok.apply_chat_template(hh_messages(p), add_generation_prompt=True) for p in prompts]
    else:
        rows = load_rows(d.source, columns=[d.prompt_column])
        prompts = list(rows[d.prompt_column])
    if d.max_rows:
        prompts = prompts[: d.max_rows]
    refs = list(rows["reference"])[: len(prompts)] if "reference" in rows.column_names else [None] * len(prompts)
    return prompts, refs


class Rollout(NamedTuple):
    """B = n_prompts * k responses, grouped per prompt (rows i*k .. i*k+k-1 answer prompt i).

    prompts / references: [B] the prompt text and reference answer (or None) of each response.
    query, query_mask: [B, P] left-padded prompt ids. gen: the GenerationOutput (sequences [B, P+N],
    tokens, mask, lengths, ended). responses: [B] decoded answers. truncated: prompts cut to
    max_prompt_length. seconds: wall time of the generation."""

    prompts: list[str]
    references: list
    query: torch.Tensor
    query_mask: torch.Tensor
    gen: GenerationOutput
    responses: list[str]
    truncated: int
    seconds: float

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, P+N] prompt padding, then the generated tokens up to each row's EOS."""
        return torch.cat([self.query_mask, self.gen.mask], 1)


@torch.no_grad()
def sample_rollout(policy, tok: Tokenizer, prompts: Sequence[str], references: Sequence, *, gen: GenSection, k: int,
                   rng: random.Random, chat: bool, system: str | None, device) -> Rollout:
    """k sampled answers to each prompt (the policy in eval mode, KV cache, one prefill per prompt);
    the response length budget is drawn from [gen.min_new_tokens, gen.max_new_tokens] with `rng`."""
    t0 = time.perf_counter()
    ids, truncated = encode_prompts(list(prompts), tok, max_length=gen.max_prompt_length, chat=chat, system=system)
    q, qmask = left_pad(ids, tok.pad_id, device)
    was_training = policy.training
    policy.eval()
    n_new = rng.randint(gen.min_new_tokens, gen.max_new_tokens)
    g = torch.Generator(device=device).manual_seed(rng.randrange(2**31))
    out = generate(policy, q, qmask, max_new_tokens=n_new, eos_ids=tok.eos_ids, pad_id=tok.pad_id,
                   temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p, generator=g, num_samples=k,
                   compile=gen.compile)
    policy.train(was_training)
    responses = [tok.decode(t[: int(n)]) for t, n in zip(out.tokens, out.lengths)]
    return Rollout([p for p in prompts for _ in range(k)], [r for r in references for _ in range(k)],
                   q.repeat_interleave(k, 0), qmask.repeat_interleave(k, 0), out, responses, truncated,
                   time.perf_counter() - t0)


def resolve_reward_fn(spec: str) -> Callable:
    """"module:function" -> the function (responses, references) -> scores."""
    mod_name, _, fn_name = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise MinituneError(f"reward.function {spec!r} cannot be imported: {e}") from None


def score_with_function(fn: Callable, name: str, responses: list[str], references: list, device) -> torch.Tensor:
    """[B] float scores from a reward function, checked: a raised error or a wrong count/NaN is one clear line."""
    try:
        out = fn(responses, references)
    except Exception as e:
        raise MinituneError(f"reward function {name} raised {type(e).__name__}: {e}") from None
    return check_scores(out, len(responses), name).to(device)


@torch.no_grad()
def score_rollout(ro: Rollout, model, *, reward_head: RewardHead | None = None, reward_fn: Callable | None = None,
                  name: str = "", device=None) -> torch.Tensor:
    """[B] raw scores: the reward adapter "reward" + its head on the full sequences, or the function."""
    if reward_head is not None:
        with use_adapter(model, "reward"):
            return sequence_rewards(model, reward_head, ro.gen.sequences, ro.attention_mask).float()
    return score_with_function(reward_fn, name, ro.responses, ro.references, device)


def sampled_logprobs(model, seq: torch.Tensor, mask: torch.Tensor, prompt_len: int,
                      temperature: float) -> torch.Tensor:
    """[B, R] log-probs of the response tokens seq[:, P:] under softmax(logits / temperature), the
    distribution they were sampled from; logits only over the response (none over the prompt)."""
    out = model(seq, positions_from_mask(mask), mask, logits_from=prompt_len - 1)
    return logprobs_from_logits(out.logits[:, :-1], seq[:, prompt_len:], temperature)


def prompts_use_chat(d) -> bool:
    """Whether rollout prompts go through the chat template as one user message (a prompt column
    under `data.template: chat`, and the synthetic task); hh dialogues are rendered whole by
    `load_prompts` instead."""
    return d.template.value == "chat" and not d.hh_format


def check_reward_adapter(d, folder: str) -> None:
    """Before any model loads: the reward adapter was trained on prompts rendered as these are."""
    if not (Path(folder) / "adapter_config.json").exists():
        raise MinituneError(f"reward.adapter {folder}: no adapter_config.json there; train one with "
                            "recipes/reward_model.py (its output_dir/adapter)")
    check_rendering(folder, prompt_rendering(d, chat=prompts_use_chat(d)))
