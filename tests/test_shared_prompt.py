"""Shared-prompt pair layout: each side's rewards, log-probs and gradients equal those of the side
run as its own sequence."""
import random

import pytest
import torch
import torch.nn.functional as F

from minitune import build_model
from minitune.data.shared_prompt import SharedPair, layout_pairs, pack_rows, tokenize_shared_pair
from minitune.data.preference import PairStats, PreferencePair
from minitune.lora import LoRAConfig, apply_lora
from minitune.model import ModelConfig
from minitune.reward import RewardHead, pair_rewards, sequence_rewards


def cfg(n_kv: int) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=512)


def random_pairs(n=7, seed=0, with_empty_prompt=True):
    rng = random.Random(seed)
    toks = lambda lo, hi: [rng.randrange(3, 64) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    pairs = [SharedPair(toks(1, 40), toks(1, 20) + [2], toks(1, 25) + [2]) for _ in range(n)]
    if with_empty_prompt:
        pairs.append(SharedPair([], toks(2, 9), toks(2, 9)))
    return pairs


def model_with_lora(n_kv):
    model = build_model(cfg(n_kv), seed=0)
    apply_lora(model, LoRAConfig(r=4, alpha=8.0, dropout=0.0), "a")
    for name, p in model.named_parameters():  # a non-zero adapter, so that its gradients are not trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_rows_are_packed_first_fit_decreasing_without_overflow():
    lengths = [50, 10, 40, 30, 20, 60, 5]
    rows = pack_rows(lengths)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 60 for r in rows)
    assert len(rows) == 4  # 60 | 50+10 | 40+20 | 30+5 (210 tokens need at least 4 rows of 60)


@pytest.mark.parametrize("n_kv", [4, 2])
def test_rewards_and_head_gradients_equal_each_side_alone(n_kv):
    torch.manual_seed(0)
    pairs = random_pairs(seed=n_kv)
    model, head = model_with_lora(n_kv), RewardHead(64)
    layout = layout_pairs(pairs, pad_id=0)
    assert layout.input_ids.numel() < sum(len(p.prompt) * 2 + len(p.chosen) + len(p.rejected) for p in pairs)
    c, r = pair_rewards(model, head, layout)
    (c.sum() - 2 * r.sum()).backward()
    grads = {n: p.grad.clone() for n, p in list(model.named_parameters()) + list(head.named_parameters()) if p.grad is not None}
    model.zero_grad(), head.zero_grad()
    ref_c, ref_r = [], []
    for p in pairs:  # every side as its own unpadded sequence
        for side, out in ((p.chosen, ref_c), (p.rejected, ref_r)):
            ids = torch.tensor([p.prompt + side])
            out.append(sequence_rewards(model, head, ids, torch.ones_like(ids))[0])
    ref_c, ref_r = torch.stack(ref_c), torch.stack(ref_r)
    (ref_c.sum() - 2 * ref_r.sum()).backward()
    assert (c - ref_c).abs().max().item() < 1e-5
    assert (r - ref_r).abs().max().item() < 1e-5
    checked = 0
    for n, p in list(model.named_parameters()) + list(head.named_parameters()):
        if p.grad is not None:
            assert torch.allclose(grads[n], p.grad, atol=1e-5, rtol=1e-4), n
            checked += 1
    assert checked >= 9  # LoRA A and B of every adapted layer, and the head


@pytest.mark.parametrize("n_kv", [4, 2])
def test_response_logprobs_equal_each_side_alone(n_kv):
    pairs = random_pairs(seed=10 + n_kv)
    model = model_with_lora(n_kv)
    layout = layout_pairs(pairs, pad_id=0)
    with torch.no_grad():
        logits = model(layout.input_ids, layout.position_ids, layout.mask, logits_at=layout.predictors).logits
    lp = F.log_softmax(logits.float(), -1).gather(-1, layout.targets[:, None])[:, 0]
    summed = torch.zeros(2 * len(pairs)).index_add(0, layout.sides, lp)
    for i, p in enumerate(pairs):
        for k, side in enumerate((p.chosen, p.rejected)):
            ids = torch.tensor([p.prompt + side])
            with torch.no_grad():
                full = F.log_softmax(model(ids).logits[0].float(), -1)
            start = max(len(p.prompt), 1)  # the first token has nothing before it
            want = sum(full[t - 1, ids[0, t]] for t in range(start, ids.shape[1]))
            assert abs(summed[k * len(pairs) + i].item() - float(want)) < 1e-4, (i, k)
    # every response token but a prompt-less pair's first is scored once
    assert layout.targets.numel() == sum(len(p.chosen) + len(p.rejected) - (2 if not p.prompt else 0) for p in pairs)


def test_truncation_keeps_one_prompt_for_both_sides(demo_tok):
    pair = PreferencePair("Human: " + "tell me more " * 80 + "\n\nAssistant:", " Sure, " * 30, " No.")
    stats = PairStats()
    sp = tokenize_shared_pair(pair, demo_tok, 64, stats)
    assert stats.truncated == 1
    assert len(sp.prompt) + len(sp.chosen) <= 64 and len(sp.prompt) + len(sp.rejected) <= 64
    assert len(sp.prompt) >= 32 and sp.rejected[-1] == demo_tok.eos_id  # short side keeps its EOS
    assert demo_tok.decode(sp.prompt).endswith("Assistant:")  # the oldest tokens went first
    short = tokenize_shared_pair(PreferencePair("Human: hi\n\nAssistant:", " Hello.", " Go away."), demo_tok, 64, stats)
    assert stats.truncated == 1 and demo_tok.decode(short.prompt + short.chosen) == "Human: hi\n\nAssistant: Hello."


@pytest.mark.parametrize("n_kv", [4, 2])
def test_rl_policy_forward_equals_the_padded_rows(n_kv):
    """PPO's and GRPO's update forward (`policy_forward`) runs each prompt once for its k sampled
    answers: the log-probs (under the sampling temperature), values, entropies, logits and the LoRA
    and value-head gradients equal those of the padded [prompt | answer] rows run as they were
    generated, with left padding, answers of different lengths (EOS) and one cut short as a stop
    string cuts it."""
    from minitune.generate import generate, left_pad, positions_from_mask
    from minitune.heads import WithHead
    from minitune.ppo import ValueHead, entropy_from_logits, logprobs_from_logits, policy_forward

    torch.manual_seed(0)
    model = model_with_lora(n_kv).eval()
    rng = random.Random(n_kv)
    prompts = [[rng.randrange(3, 64) for _ in range(rng.randint(3, 12))] for _ in range(4)]
    k, T = 3, 0.7
    q, qmask = left_pad(prompts, 0, "cpu")
    with torch.no_grad():
        gen = generate(model, q, qmask, max_new_tokens=10, eos_ids=[2, 5, 7, 11], pad_id=0, temperature=1.5,
                       generator=torch.Generator().manual_seed(1), num_samples=k)
    rmask = gen.mask.clone()
    assert len(set(gen.lengths.tolist())) > 1  # answers of different lengths
    rmask[int(gen.lengths.argmax()), 4:] = 0  # a stop-string cut: only the kept tokens count
    seq, P = gen.sequences, q.shape[1]
    amask = torch.cat([qmask.repeat_interleave(k, 0), rmask], 1)
    head = ValueHead(64, dropout=0.0)
    torch.nn.init.normal_(head.summary.weight, std=0.1)
    wrapped = WithHead(model, head)
    w = torch.randn(rmask.shape)

    logp, values, ent, logits = policy_forward(wrapped, seq, amask, rmask, k, T, with_entropy=True, with_logits=True)
    ((logp + values + ent) * w * rmask).sum().backward()
    grads = {n: p.grad.clone() for n, p in wrapped.named_parameters() if p.grad is not None}
    wrapped.zero_grad()
    out, v = wrapped(seq, positions_from_mask(amask), amask, logits_from=P - 1, head_on=lambda h: h[:, P - 1: -1])
    ref_logits = out.logits[:, :-1]
    want = (logprobs_from_logits(ref_logits, seq[:, P:], T), v, entropy_from_logits(ref_logits, T))
    (sum(want) * w * rmask).sum().backward()
    for got, ref in zip((logp, values, ent, logits), (*want, ref_logits)):
        m = rmask if got.dim() == 2 else rmask[..., None]
        assert (got * m - ref * m).abs().max().item() < 1e-4
        assert (got[rmask == 0] == 0).all()  # nothing past a response
    checked = 0
    for n, p in wrapped.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[n], p.grad, atol=1e-5, rtol=1e-4), n
            checked += 1
    assert checked >= 9  # LoRA A and B of every adapted layer, and the value head
