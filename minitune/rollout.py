"""Rollouts for the RL recipes (PPO, GRPO): load the prompt pool, sample answers to a batch of
prompts with the policy (k per prompt from one prefill), and score them."""
from __future__ import annotations

import importlib
import random
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

from minitune.data.loading import train_and_eval_rows
from minitune.data.preference import hh_messages, split_hh
from minitune.data.prompts import encode_prompts, prompt_rendering
from minitune.data.synthetic import SYSTEM, train_eval_split
from minitune.errors import MinituneError
from minitune.generate import GenerationOutput, generate, left_pad
from minitune.lora import use_adapter
from minitune.ppo import check_scores, policy_forward
from minitune.reward import RewardHead, check_rendering, sequence_rewards
from minitune.tokenizer import Tokenizer
from minitune.train.sections import GenSection, RewardSource


class PromptSplit(NamedTuple):
    """Rollout prompts and the held-out prompts an RL recipe evaluates on, with their reference
    answers (None where the data has none)."""

    prompts: list[str]
    references: list
    held_out: list[str]
    held_out_references: list


def load_prompts(d, seed: int, tok: Tokenizer | None = None) -> PromptSplit:
    """Training and held-out prompts for rollouts from a DataSection. The synthetic task: its
    training split and its held-out split. Otherwise rows of
    `d.source` split like the other recipes split them (`data.eval_source`, or `data.holdout`
    carved out with `seed`): hh-rlhf dialogues cut before the last answer (with `data.hh_chat`,
    rendered through `tok`'s chat template), or a prompt column (with a "reference" column when
    the file has one). `max_rows` keeps the first training prompts. With the reward recipe's source,
    holdout and seed, the held-out prompts are those of the pairs the reward model never trained on."""
    if d.source == "synthetic":
        train, held = train_eval_split(d.synthetic_train, d.synthetic_eval, seed=seed)
        train = train[: d.max_rows] if d.max_rows else train  # a pool smaller than the split it comes from
        return PromptSplit([ex["prompt"] for ex in train], [ex["answer"] for ex in train],
                           [ex["prompt"] for ex in held], [ex["answer"] for ex in held])
    columns = [d.chosen_column, d.rejected_column] if d.hh_format else [d.prompt_column]
    train_rows, held_rows = train_and_eval_rows(d.source, columns, eval_source=d.eval_source, holdout=d.holdout,
                                                seed=seed)
    if d.max_rows:  # a training pool smaller than the split, as for the synthetic task
        train_rows = train_rows.select(range(min(d.max_rows, len(train_rows))))

    def prompts_refs(rows) -> tuple[list[str], list]:
        if d.hh_format:
            prompts = [split_hh(r[d.chosen_column], r[d.rejected_column]).prompt for r in rows]
            if d.hh_chat:
                prompts = [tok.apply_chat_template(hh_messages(p), add_generation_prompt=True) for p in prompts]
        else:
            prompts = list(rows[d.prompt_column])
        refs = list(rows["reference"]) if "reference" in rows.column_names else [None] * len(prompts)
        return prompts, refs

    return PromptSplit(*prompts_refs(train_rows), *prompts_refs(held_rows))


class Rollout(NamedTuple):
    """B = n_prompts * k responses, grouped per prompt (rows i*k .. i*k+k-1 answer prompt i).

    prompts / references: [B] the prompt text and reference answer (or None) of each response.
    query, query_mask: [B, P] left-padded prompt ids. gen: the GenerationOutput (sequences [B, P+N],
    tokens, mask, lengths, ended: by EOS or a stop string). responses: [B] decoded answers.
    truncated: prompts cut to max_prompt_length. seconds: wall time of the generation. stopped: [B]
    True where a stop string (`gen.stop`) ended the answer."""

    prompts: list[str]
    references: list
    query: torch.Tensor
    query_mask: torch.Tensor
    gen: GenerationOutput
    responses: list[str]
    truncated: int
    seconds: float
    stopped: torch.Tensor

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, P+N] prompt padding, then the generated tokens up to each row's EOS."""
        return torch.cat([self.query_mask, self.gen.mask], 1)


@torch.no_grad()
def sample_rollout(policy, tok: Tokenizer, prompts: Sequence[str], references: Sequence, *, gen: GenSection, k: int,
                   rng: random.Random, chat: bool, system: str | None, device) -> Rollout:
    """k sampled answers to each prompt (the policy in eval mode, KV cache, one prefill per prompt);
    the response length budget is drawn from [gen.min_new_tokens, gen.max_new_tokens] with `rng`.
    With `gen.greedy_member` (and k > 1) each prompt's first answer is the greedy one, decoded in the same
    batch (to the same budget); the other answers are the samples drawn without the option."""
    t0 = time.perf_counter()
    ids, truncated = encode_prompts(list(prompts), tok, max_length=gen.max_prompt_length, chat=chat, system=system)
    q, qmask = left_pad(ids, tok.pad_id, device)
    was_training = policy.training
    policy.eval()
    n_new = rng.randint(gen.min_new_tokens, gen.max_new_tokens)
    g = torch.Generator(device=device).manual_seed(rng.randrange(2**31))
    greedy_first = gen.greedy_member and k > 1
    if greedy_first:  # the draws of the separate greedy pass this replaced: runs recorded before stay reproducible
        rng.randint(gen.max_new_tokens, gen.max_new_tokens), rng.randrange(2**31)
    out = generate(policy, q, qmask, max_new_tokens=n_new, eos_ids=tok.eos_ids, pad_id=tok.pad_id,
                   temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p, generator=g, num_samples=k,
                   compile=gen.compile,
                   greedy_rows=(torch.arange(len(prompts) * k, device=device) % k == 0) if greedy_first else None)
    policy.train(was_training)
    out, stopped = cut_at_stop_strings(out, tok, gen.stop, q.shape[1], tok.pad_id)
    responses = [tok.decode(t[: int(n)]) for t, n in zip(out.tokens, out.lengths)]
    ro = Rollout([p for p in prompts for _ in range(k)], [r for r in references for _ in range(k)],
                 q.repeat_interleave(k, 0), qmask.repeat_interleave(k, 0), out, responses, truncated,
                 time.perf_counter() - t0, stopped)
    return ro


def _replace_rows(ro: Rollout, rows: dict[int, tuple[list[int], bool, bool, str]], pad_id: int) -> Rollout:
    """`ro` with rows b replaced by (response tokens, ended, stopped, text); the response tensors
    widen when a new row is longer than every old one; new rows' sampling log-probs are 0."""
    if not rows:
        return ro
    g = ro.gen
    B, N = g.tokens.shape
    P = g.sequences.shape[1] - N
    pad = max(N, *(len(t) for t, *_ in rows.values())) - N

    def widen(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, pad), value=value) if pad else t.clone()

    tokens, logprobs, mask, seq = widen(g.tokens, pad_id), widen(g.logprobs, 0.0), widen(g.mask, 0), \
        widen(g.sequences, pad_id)
    lengths, ended, stopped, responses = g.lengths.clone(), g.ended.clone(), ro.stopped.clone(), list(ro.responses)
    for b, (t, end, stop, text) in rows.items():
        n = len(t)
        row = torch.tensor(t, dtype=tokens.dtype, device=tokens.device)
        tokens[b], logprobs[b], mask[b] = pad_id, 0.0, 0
        tokens[b, :n], mask[b, :n] = row, 1
        seq[b, P:] = pad_id
        seq[b, P: P + n] = row
        lengths[b], ended[b], stopped[b], responses[b] = n, end, stop, text
    return ro._replace(gen=GenerationOutput(seq, tokens, logprobs, mask, lengths, ended), responses=responses,
                       stopped=stopped)


def empty_answers(responses: Sequence[str]) -> torch.Tensor:
    """[B] bool: True where an answer is empty or only whitespace (e.g. an immediate EOS)."""
    return torch.tensor([not r.strip() for r in responses], dtype=torch.bool)


def answer_penalties(ro: Rollout, reward: RewardSource) -> torch.Tensor:
    """[B] what `reward.missing_eos_penalty` and `reward.empty_penalty` take off each answer's score:
    answers the token budget cut off, and answers with nothing but whitespace. PPO subtracts them
    after its score normalization, GRPO before its group advantages. On the rollout's device."""
    p = torch.zeros(len(ro.responses), device=ro.gen.ended.device)
    if reward.missing_eos_penalty:
        p += reward.missing_eos_penalty * (~ro.gen.ended).float()
    if reward.empty_penalty:
        p += reward.empty_penalty * empty_answers(ro.responses).float().to(p.device)
    return p


def with_answers(ro: Rollout, answers: dict[int, str], tok: Tokenizer) -> Rollout:
    """`ro` with the answers of some rows replaced by given text (its tokens and an EOS, as the policy
    would end it), e.g. a reference answer put into a group that sampled no right one (GRPO's
    `guide`). Widens the response tensors when a given answer is longer than every sampled one;
    the new rows' sampling log-probs are 0 (they were not sampled: recompute them, as GRPO does)."""
    return _replace_rows(ro, {b: (tok.encode(text, add_special_tokens=False) + [tok.eos_id], True, False, text)
                              for b, text in answers.items()}, tok.pad_id)


def demonstrations(ro: Rollout, group: int, tok: Tokenizer) -> Rollout:
    """One row per prompt of `ro` (its groups of `group` answers), the answer replaced by the prompt's
    reference answer and an EOS: the supervised examples of a step's prompts, laid out as a rollout so
    the same shared-prompt forward scores them (GRPO's `sft_coef`, InstructGPT's PPO-ptx on SFT data)."""
    if any(r is None for r in ro.references[::group]):
        raise MinituneError("these prompts have no reference answers to learn from: use data with a `reference` "
                            "column (or the synthetic task), or set the sft_coef to 0")
    rows = torch.arange(0, len(ro.responses), group, device=ro.query.device)
    one = ro._replace(prompts=ro.prompts[::group], references=ro.references[::group], query=ro.query[rows],
                      query_mask=ro.query_mask[rows], gen=GenerationOutput(*(t[rows] for t in ro.gen)),
                      responses=ro.responses[::group], stopped=ro.stopped[rows])
    return with_answers(one, dict(enumerate(one.references)), tok)


def demonstration_nll(model, demo: Rollout) -> torch.Tensor:
    """Mean negative log-likelihood (temperature 1) of the reference answers in `demo` (one row per
    prompt, `demonstrations`), over their tokens and EOS: the supervised term of GRPO's `sft_coef`.
    `model` is the policy (a `WithHead` wrapper is called without its head)."""
    logp = policy_forward(model, demo.gen.sequences, demo.attention_mask, demo.gen.mask, 1, 1.0, values=False)[0]
    mask = demo.gen.mask.float()
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


def stop_cut(tok: Tokenizer, tokens: list[int], stops: Sequence[str]) -> int | None:
    """How many of `tokens` to keep when the answer they decode to contains a stop string: the
    tokens before the one where the earliest stop string begins (at least one; a stop string in
    the answer's leading whitespace does not count). None when no stop string occurs."""
    text = tok.decode(tokens)
    lead = len(text) - len(text.lstrip())
    hits = [i for i in (text.find(s, lead) for s in stops) if i >= 0]
    if not hits:
        return None
    start = min(hits)
    # the longest prefix whose text ends at or before `start` (prefix text only grows with more
    # tokens): a binary search, O(log n) decodes instead of one per token
    lo, hi = 0, len(tokens)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tok.decode(tokens[:mid])) <= start:
            lo = mid
        else:
            hi = mid - 1
    return max(lo, 1)


def cut_at_stop_strings(out: GenerationOutput, tok: Tokenizer, stops: Sequence[str], prompt_len: int,
                        pad_id: int) -> tuple[GenerationOutput, torch.Tensor]:
    """(out with every answer that contains a stop string cut before it and marked ended, [B] bool
    True for those rows). The stop string and what follows become padding outside the mask, as
    after an EOS: the reward sees the answer as the data ends its turns, and no gradient reaches the
    cut tokens (as with vLLM's or TRL's `stop` strings). Raw-text dialogues ("...\n\nAssistant:")
    need it: a model continues them with the next "\n\nHuman:" turn instead of an EOS."""
    stopped = torch.zeros(len(out.lengths), dtype=torch.bool)
    if not stops:
        return out, stopped
    tokens, logprobs, mask, seq = out.tokens.clone(), out.logprobs.clone(), out.mask.clone(), out.sequences.clone()
    lengths, ended = out.lengths.clone(), out.ended.clone()
    for b, n in enumerate(out.lengths.tolist()):
        keep = stop_cut(tok, out.tokens[b, :n].tolist(), stops)
        if keep is None or keep >= n:
            continue
        tokens[b, keep:], logprobs[b, keep:], mask[b, keep:] = pad_id, 0.0, 0
        seq[b, prompt_len + keep:] = pad_id
        lengths[b], ended[b], stopped[b] = keep, True, True
    return GenerationOutput(seq, tokens, logprobs, mask, lengths, ended), stopped.to(out.lengths.device)


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


def prompts_use_chat(d) -> bool:
    """Whether rollout prompts go through the chat template as one user message (a prompt column
    under `data.template: chat`, and the synthetic task); hh dialogues are rendered whole by
    `load_prompts` instead."""
    return d.template.value == "chat" and not d.hh_format


def prompts_system(d) -> str | None:
    """The system message rollout prompts get: the synthetic task's instruction, else none."""
    return SYSTEM if d.source == "synthetic" else None


def check_reward_adapter(d, folder: str) -> None:
    """Before any model loads: the reward adapter was trained on prompts rendered as these are."""
    if not (Path(folder) / "adapter_config.json").exists():
        raise MinituneError(f"reward.adapter {folder}: no adapter_config.json there; train one with "
                            "recipes/reward_model.py (its output_dir/adapter)")
    check_rendering(folder, prompt_rendering(d, chat=prompts_use_chat(d)))
