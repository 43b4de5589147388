"""Batched generation with a KV cache: `prefill` the left-padded prompts, then `decode_one_token`."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from minitune.distributed import all_ranks, all_reduce_max, sharded
from minitune.errors import MinituneError
from minitune.model import Transformer


class GenerationOutput(NamedTuple):
    """sequences: [B, P+N] prompts (as given, left-padded) followed by the responses.
    tokens: [B, N] generated tokens; `pad_id` after a row stopped.
    logprobs: [B, N] log-prob of each generated token under the temperature-scaled full
      distribution (the one PPO recomputes); 0 after a row stopped.
    mask: [B, N] 1 for generated tokens up to and including the EOS that stopped the row.
    lengths: [B] number of generated tokens per row. ended: [B] True where an EOS was produced."""

    sequences: torch.Tensor
    tokens: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    ended: torch.Tensor


def left_pad(batch: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads id lists to [B, P]; returns (input_ids, attention_mask)."""
    P = max(len(x) for x in batch)
    ids = torch.full((len(batch), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), P), dtype=torch.long)
    for i, x in enumerate(batch):
        if len(x):
            ids[i, P - len(x):] = torch.as_tensor(list(x))
            mask[i, P - len(x):] = 1
    return ids.to(device), mask.to(device)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Sets logits outside the top-k / nucleus (top-p) set to -inf. logits: [B, V]."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float, generator=None,
                 uniform: torch.Tensor | None = None, greedy: torch.Tensor | None = None):
    """Picks the next token [B] and its log-prob [B] from logits [B, V] (fp32).

    temperature 0 is greedy. Sampling draws token j with probability p_j (after the top-k/top-p
    cut) as argmax_j p_j / E_j with E_j = -log(u_j) exponential (the "exponential race"), u from
    `uniform` [B, V] when given (overwritten: the race runs in place on it), else drawn from `generator`:
    a row's token then depends only on its own noise, not on which other rows are in the batch. The
    race's passes over [B, V] run in place on tensors made here (fresh [B, V] tensors cost page faults
    on every step; the values are bitwise those of the out-of-place expression). The log-prob is taken under
    softmax(logits / temperature) before the top-k/top-p cut, so that it equals what a later
    forward pass with the same temperature gives. `greedy` [B] bool: those rows take the most likely
    token instead (their log-prob as above), the others are sampled as without it.
    """
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, F.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    scaled = logits / temperature
    probs = filter_logits(scaled, top_k, top_p).softmax(-1)
    if uniform is None:
        uniform = torch.rand(probs.shape, generator=generator, device=probs.device)
    tok = probs.div_(uniform.clamp_(min=1e-38).log_().neg_()).argmax(-1)  # p_j / E_j, E_j = -log(u_j)
    if greedy is not None:
        tok = torch.where(greedy, logits.argmax(-1), tok)
    return tok, F.log_softmax(scaled, -1).gather(-1, tok[:, None])[:, 0]


def prefill(model: Transformer, ids, attention_mask, position_ids) -> torch.Tensor:
    """Fills the cache with the prompts; fp32 logits [B, V] of the last position only (the output
    projection of the others, a 49k-vocabulary matmul per prompt token, is skipped)."""
    out = model(ids, position_ids, attention_mask, cache_pos=0, logits_from=ids.shape[1] - 1)
    return out.logits[:, -1].float()


def decode_one_token(model: Transformer, tok, key_mask, position, input_pos) -> torch.Tensor:
    """One static-shape step: tok [B] at cache slot input_pos [1], attending over the whole cache
    where key_mask [B, max_len] is True. Returns fp32 logits [B, V]."""
    out = model(tok[:, None], position[:, None], key_mask, cache_pos=input_pos)
    return out.logits[:, -1].float()


# With `compile=True` the KV cache is allocated in multiples of this many slots, so rollouts of
# varying prompt and response lengths reuse a few compiled shapes instead of compiling each length.
CACHE_BUCKET = 64
_compiled: dict[str, object] = {}


def compiled_decode(device_type: str):
    """`decode_one_token` compiled once per device type: CUDA graphs on GPU ("reduce-overhead": the
    step's ~10 kernels per layer replay as one launch), the inductor C++ backend on CPU. Guards
    recompile when the model, its active adapter or a shape changes, so LoRA switching stays correct."""
    if device_type not in _compiled:
        mode = "reduce-overhead" if device_type == "cuda" else None
        _compiled[device_type] = torch.compile(decode_one_token, mode=mode, dynamic=False)
    return _compiled[device_type]


# Rows that finished are checked for every this many tokens (a host sync); until then a finished row
# keeps producing pad, which costs at most this many extra steps and is trimmed from the output.
CHECK_DONE_EVERY = 8


@torch.no_grad()
def generate(
    model: Transformer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    num_samples: int = 1,
    compile: bool = False,
    drop_finished: bool = True,
    greedy_rows: torch.Tensor | None = None,
) -> GenerationOutput:
    """Generates up to `max_new_tokens` for each left-padded prompt in input_ids [B, P].

    Rows stop independently at any id in `eos_ids`. With the cache, each decode step has the same
    shapes: the new token's K/V are written in place at its cache slot, attention runs over the whole
    preallocated cache under a mask of the slots written so far, GQA heads are shared inside SDPA,
    and the host reads device values only every CHECK_DONE_EVERY tokens. `use_cache=False`
    recomputes the whole sequence each step (the reference the cache is tested against). `num_samples` > 1 answers each prompt
    that many times (output rows i*n .. i*n+n-1 belong to prompt i) from one prefill whose KV cache is
    copied: the prompt's forward is paid once, not n times. `compile=True` runs the decode step
    through `torch.compile` (see `compiled_decode`; prefill stays eager, its length varies); its
    first call per shape pays the compilation. `drop_finished` (with the cache, not compiled): at each
    check, once a quarter of the rows still in the batch have finished, they leave it (their cache rows
    too), so the decode steps compute only rows still generating; the tokens do not change, since each
    row's sampling noise is drawn for the whole batch every step (`sample_token`). RL answers of mixed
    lengths (a 3-digit sum next to a 6-number list) then cost their own length, not the longest's.
    An FSDP2-sharded model under torchrun all-gathers its parameters in every forward, so all ranks must
    run as many: each decodes to the largest `max_new_tokens` of any rank (its own rows stop at its own)
    and until the rows of all ranks have finished (checked together every CHECK_DONE_EVERY tokens); a rank
    whose rows are done keeps stepping them as padding, and its tokens do not change.
    Returns a GenerationOutput.
    """
    if num_samples < 1:
        raise MinituneError(f"num_samples must be >= 1, got {num_samples}")
    n_prompts, P = input_ids.shape
    B = n_prompts * num_samples
    dev = input_ids.device
    limit = model.config.max_position_embeddings
    if P + max_new_tokens > limit:
        raise MinituneError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds the model's context ({limit})")
    budget, lockstep = max_new_tokens, sharded(model)
    if lockstep:  # every rank steps to the largest budget; rows past their own are done
        max_new_tokens = int(all_reduce_max(torch.tensor([budget], device=dev)).item())
        if P + max_new_tokens > limit:
            raise MinituneError(f"prompt ({P}) + another rank's max_new_tokens ({max_new_tokens}) exceeds the "
                                f"model's context ({limit}): every rank of a sharded model decodes as many steps")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prompt_ids = input_ids
    input_ids, attention_mask = input_ids.repeat_interleave(num_samples, 0), attention_mask.repeat_interleave(num_samples, 0)
    mask = torch.cat([attention_mask.long(), torch.ones(B, max_new_tokens, dtype=torch.long, device=dev)], 1)
    positions = positions_from_mask(mask)  # (B, P+N)
    eos = torch.tensor(list(eos_ids) or [-1], device=dev)
    seq = torch.cat([input_ids, torch.full((B, max_new_tokens), pad_id, dtype=input_ids.dtype, device=dev)], 1)
    logprobs = torch.zeros(B, max_new_tokens, device=dev)
    gen_mask = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)
    ended = torch.zeros(B, dtype=torch.bool, device=dev)
    try:
        if use_cache:
            S = P + max_new_tokens
            S = -(-S // CACHE_BUCKET) * CACHE_BUCKET if compile else S  # a few static shapes, not one per length
            model.setup_cache(n_prompts, S)
            step = compiled_decode(dev.type) if compile else decode_one_token
            logits = prefill(model, prompt_ids, mask[::num_samples, :P], positions[::num_samples, :P])
            if num_samples > 1:
                model.repeat_cache(num_samples)
                logits = logits.repeat_interleave(num_samples, 0)
            key_mask = torch.zeros(B, S, dtype=torch.bool, device=dev)  # the prompt's padding, then slots as written
            key_mask[:, :P] = mask[:, :P].bool()
        else:
            logits = prefill(model, input_ids, mask[:, :P], positions[:, :P])
        compact = drop_finished and use_cache and not compile
        rows = torch.arange(B, device=dev)  # the output row of each row still in the batch
        live_done = torch.zeros(B, dtype=torch.bool, device=dev)  # of the rows still in the batch
        live_keys = key_mask if use_cache else None
        noise_buf = torch.empty((B, logits.shape[-1]), device=dev) if temperature > 0 else None
        for n in range(max_new_tokens):
            noise = None
            if temperature > 0:  # drawn for every output row, so a row's token does not depend on the others
                noise_buf.uniform_(generator=generator)  # the values of torch.rand((B, V)), without a fresh [B, V]
                noise = noise_buf if len(rows) == B else noise_buf[rows]
            tok, lp = sample_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, uniform=noise,
                                   greedy=None if greedy_rows is None else greedy_rows[rows])
            tok = torch.where(live_done, torch.full_like(tok, pad_id), tok)
            seq[rows, P + n] = tok
            logprobs[rows, n] = torch.where(live_done, torch.zeros_like(lp), lp)
            gen_mask[rows, n] = (~live_done).long()
            hit = torch.isin(tok, eos) & ~live_done
            ended[rows] |= hit
            live_done = live_done | hit
            if n + 1 == budget < max_new_tokens:  # this rank's budget is spent; the others' is not (lockstep)
                live_done = torch.ones_like(live_done)
            if n == max_new_tokens - 1:
                break
            if (n + 1) % CHECK_DONE_EVERY == 0:
                n_done = int(live_done.sum())
                if all_ranks(n_done == len(rows), dev) if lockstep else n_done == len(rows):
                    break
                if compact and n_done * 4 >= len(rows) and n_done < len(rows):  # a done rank keeps its rows
                    keep = (~live_done).nonzero()[:, 0]
                    rows, live_done, live_keys, tok = rows[keep], live_done[keep], live_keys[keep], tok[keep]
                    model.select_cache(keep)
            if use_cache:
                live_keys[:, P + n] = True
                slot = torch.full((1,), P + n, dtype=torch.long, device=dev)
                logits = step(model, tok, live_keys, positions[rows, P + n], slot)
                logits = logits.clone() if compile else logits  # CUDA graphs overwrite their outputs on replay
            else:
                cur = P + n + 1
                logits = prefill(model, seq[:, :cur], mask[:, :cur], positions[:, :cur])
    finally:
        model.clear_cache()
    N = int(gen_mask.sum(1).max())  # the last step any row was still generating
    return GenerationOutput(
        seq[:, : P + N], seq[:, P: P + N], logprobs[:, :N], gen_mask[:, :N], gen_mask[:, :N].sum(1), ended
    )
