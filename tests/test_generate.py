"""KV-cache generation: equals recomputation, handles left padding, stops per row, sane log-probs."""
import torch

from helpers import lora_generation_model
from minitune import build_model, generate
from minitune.generate import filter_logits, left_pad, positions_from_mask
from minitune.model import ModelConfig

CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def model():
    return build_model(CFG, seed=0).eval()


def test_cache_equals_recompute_greedy_and_sampled():
    m = model()
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11], [3]], pad_id=0)
    for kw in (dict(temperature=0.0), dict(temperature=0.8, top_k=20, top_p=0.9)):
        a = generate(m, ids, mask, max_new_tokens=12, pad_id=0, generator=torch.Generator().manual_seed(1), **kw)
        b = generate(m, ids, mask, max_new_tokens=12, pad_id=0, generator=torch.Generator().manual_seed(1),
                     use_cache=False, **kw)
        assert torch.equal(a.tokens, b.tokens)
        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_samples_share_one_prefill_and_equal_repeated_prompts():
    # num_samples prefills each prompt once and copies its cache: the same tokens and log-probs as
    # sending every prompt n times, rows grouped per prompt
    m = model()
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11], [3]], pad_id=0)
    for kw in (dict(temperature=0.0), dict(temperature=0.8, top_k=20)):
        shared = generate(m, ids, mask, max_new_tokens=10, pad_id=0, num_samples=4,
                          generator=torch.Generator().manual_seed(3), **kw)
        repeated = generate(m, ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), max_new_tokens=10,
                            pad_id=0, generator=torch.Generator().manual_seed(3), **kw)
        assert shared.tokens.shape[0] == 12
        assert torch.equal(shared.sequences, repeated.sequences)
        assert torch.allclose(shared.logprobs, repeated.logprobs, atol=1e-5)
    sampled = shared.tokens.view(3, 4, -1)
    assert any(len({tuple(r.tolist()) for r in group}) > 1 for group in sampled)  # samples differ within a prompt


def test_left_padding_gives_the_same_tokens_as_alone():
    m = model()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    ids, mask = left_pad(prompts, pad_id=0)
    batch = generate(m, ids, mask, max_new_tokens=8, pad_id=0)
    for i, p in enumerate(prompts):
        alone = generate(m, torch.tensor([p]), max_new_tokens=8, pad_id=0)
        assert torch.equal(batch.tokens[i], alone.tokens[0])
        assert torch.allclose(batch.logprobs[i], alone.logprobs[0], atol=1e-5)


def test_stops_per_row_on_eos_and_pads_after():
    m = model()
    ids, mask = left_pad([[5, 6, 7], [8, 9, 10]], pad_id=0)
    free = generate(m, ids, mask, max_new_tokens=6, pad_id=0)
    eos = int(free.tokens[0, 2])  # make row 0's third token the EOS
    out = generate(m, ids, mask, max_new_tokens=6, pad_id=0, eos_ids=[eos])
    assert out.ended[0] and out.lengths[0] == 3
    assert out.tokens[0, 3:].eq(0).all() and out.logprobs[0, 3:].eq(0).all()
    assert out.mask[0].tolist()[:3] == [1, 1, 1]


def test_logprobs_equal_a_forward_pass():
    m = model()
    ids = torch.tensor([[4, 5, 6, 7]])
    out = generate(m, ids, max_new_tokens=6, pad_id=0, temperature=0.7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = m(out.sequences).logits[:, 3:-1] / 0.7
    ref = torch.log_softmax(logits, -1).gather(-1, out.tokens[..., None])[..., 0]
    assert torch.allclose(out.logprobs, ref, atol=1e-5)


def test_top_k_top_p_filtering():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True, True]]
    p = logits.softmax(-1)[0]
    kept = ~torch.isinf(filter_logits(logits, top_p=float(p[0] + 0.01)))
    assert kept.tolist() == [[True, True, False, False, False]]


# -- the static-shape decode path ----------------------------------------------------------------

def _eos_rows_finish_apart(m, ids, mask):
    """An EOS id that row 0 produces early and row 1 later (or never): rows finish at different steps."""
    free = generate(m, ids, mask, max_new_tokens=14, pad_id=0)
    return int(free.tokens[0, 2])


def test_static_decode_equals_recompute_in_every_setting():
    # greedy and sampled, left padding, GQA and plain multi-head, rows ending at different steps
    # (past a CHECK_DONE_EVERY boundary), several samples per prompt, with a LoRA adapter active,
    # then with adapters disabled
    from minitune.lora import disable_adapters

    for n_kv in (2, 4):
        m = lora_generation_model(n_kv)
        ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11], [3]], pad_id=0)
        eos = _eos_rows_finish_apart(m, ids, mask)
        for adapters_on in (True, False):
            ctx = torch.no_grad() if adapters_on else disable_adapters(m)
            with ctx:
                for kw in (dict(temperature=0.0), dict(temperature=0.9, top_k=30)):
                    for samples in (1, 3):
                        common = dict(max_new_tokens=14, pad_id=0, eos_ids=[eos], num_samples=samples, **kw)
                        a = generate(m, ids, mask, generator=torch.Generator().manual_seed(2), **common)
                        b = generate(m, ids.repeat_interleave(samples, 0), mask.repeat_interleave(samples, 0),
                                     use_cache=False, generator=torch.Generator().manual_seed(2),
                                     **{**common, "num_samples": 1})
                        assert torch.equal(a.sequences, b.sequences), (n_kv, adapters_on, kw, samples)
                        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
                        assert torch.equal(a.mask, b.mask) and torch.equal(a.ended, b.ended)
        lengths = generate(m, ids, mask, max_new_tokens=14, pad_id=0, eos_ids=[eos]).lengths.tolist()
        assert lengths[0] <= 3 and len(set(lengths)) > 1, lengths  # rows did finish at different steps


def test_output_is_trimmed_to_the_last_generating_step():
    # finished rows are checked for only every CHECK_DONE_EVERY tokens; the output still ends at the
    # step where the last row stopped
    m = model()
    ids, mask = left_pad([[5, 6, 7], [8, 9, 10]], pad_id=0)
    free = generate(m, ids, mask, max_new_tokens=20, pad_id=0)
    eos = [int(free.tokens[0, 1]), int(free.tokens[1, 2])]
    out = generate(m, ids, mask, max_new_tokens=20, pad_id=0, eos_ids=eos)
    assert out.ended.all()
    assert out.tokens.shape[1] == int(out.lengths.max()) == out.sequences.shape[1] - ids.shape[1]


def test_a_second_call_with_another_shape_does_not_reuse_the_cache():
    m = model()
    big_ids, big_mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], pad_id=0)
    generate(m, big_ids, big_mask, max_new_tokens=20, pad_id=0)
    ids = torch.tensor([[40, 41]])
    after = generate(m, ids, max_new_tokens=6, pad_id=0)
    fresh = generate(model(), ids, max_new_tokens=6, pad_id=0)
    assert torch.equal(after.tokens, fresh.tokens) and torch.allclose(after.logprobs, fresh.logprobs, atol=1e-6)
    assert all(layer.self_attn.kv_cache is None for layer in m.model.layers)  # released after each call


def test_writing_past_the_cache_is_refused():
    import pytest

    from minitune import MinituneError

    m = model()
    m.setup_cache(1, 4)
    with pytest.raises(MinituneError, match="KV cache holds 4 positions, writing up to 6"):
        m(torch.tensor([[1, 2, 3, 4, 5, 6]]), cache_pos=0)
    m.clear_cache()
    with pytest.raises(MinituneError, match="exceeds the model's context"):
        generate(m, torch.tensor([[1] * 120]), max_new_tokens=20, pad_id=0)


def test_compiled_decode_equals_eager_with_lora_on_and_off():
    # torch.compile of the decode step (inductor C++ here, CUDA graphs on GPU): the same tokens and
    # log-probs as the eager static path, greedy and sampled, several samples per prompt, rows ending
    # apart; a second call with another batch and a switch of the active adapter recompile, never
    # reuse a stale graph or cache
    from minitune.lora import disable_adapters

    m = lora_generation_model(2)
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11], [3]], pad_id=0)
    eos = _eos_rows_finish_apart(m, ids, mask)
    for adapters_on, samples in ((True, 1), (True, 3), (False, 1)):
        with torch.no_grad() if adapters_on else disable_adapters(m):
            for kw in (dict(temperature=0.0), dict(temperature=0.9, top_k=30)):
                common = dict(max_new_tokens=14, pad_id=0, eos_ids=[eos], num_samples=samples, **kw)
                a = generate(m, ids, mask, generator=torch.Generator().manual_seed(2), compile=True, **common)
                b = generate(m, ids, mask, generator=torch.Generator().manual_seed(2), **common)
                assert torch.equal(a.sequences, b.sequences), (adapters_on, samples, kw)
                assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
                assert torch.equal(a.mask, b.mask) and torch.equal(a.ended, b.ended)


def test_finished_rows_leave_the_batch_without_changing_any_token(monkeypatch):
    # drop_finished: once a quarter of the rows in the batch have finished, they leave it (cache rows
    # too). Each row's sampling noise is drawn for the whole batch every step, so tokens, log-probs,
    # masks and EOS flags equal those of the run that keeps every row to the end, greedy and sampled.
    m = lora_generation_model(2)
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11], [3], [40, 41, 42], [7, 7]], pad_id=0)
    free = generate(m, ids, mask, max_new_tokens=30, pad_id=0)
    eos = sorted({int(t) for t in free.tokens[:, 2:12:3].flatten()})[:4]  # rows finish over several checks
    sizes = []
    select = type(m).select_cache
    monkeypatch.setattr(type(m), "select_cache", lambda self, rows: (sizes.append(len(rows)), select(self, rows))[1])
    for kw in (dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_p=0.9)):
        common = dict(max_new_tokens=30, pad_id=0, eos_ids=eos, num_samples=3, **kw)
        sizes.clear()
        a = generate(m, ids, mask, generator=torch.Generator().manual_seed(3), **common)
        assert sizes and sizes[-1] < 15, (kw, sizes)  # rows did leave the batch
        b = generate(m, ids, mask, generator=torch.Generator().manual_seed(3), drop_finished=False, **common)
        assert torch.equal(a.sequences, b.sequences), kw
        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
        assert torch.equal(a.mask, b.mask) and torch.equal(a.ended, b.ended) and torch.equal(a.lengths, b.lengths)
        assert len(set(a.lengths.tolist())) > 2


def test_sampling_draws_each_token_with_its_probability():
    # the exponential race (argmax p / E, E ~ Exp(1)) samples from p: frequencies over 20k draws
    from minitune.generate import sample_token

    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = p.clamp(min=1e-30).log().expand(20000, -1)
    tok, _ = sample_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=5).float() / len(tok)
    assert (freq - p).abs().max().item() < 0.01, freq


def test_sampled_tokens_follow_the_documented_noise_stream():
    # what makes recorded runs repeat: each step draws torch.rand((B, V)) from the generator for every row
    # and row b takes argmax_j softmax(logits_b / T)_j / -log(u_bj). A loop written from that sentence
    # (full recompute each step) must give generate's tokens exactly; the in-place race changes no value
    from minitune.generate import sample_token

    m = model()
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11], [3]], pad_id=0)
    out = generate(m, ids, mask, max_new_tokens=8, pad_id=0, temperature=0.8, num_samples=2,
                   generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    seq, am = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)
    for _ in range(8):
        with torch.no_grad():
            logits = m(seq, positions_from_mask(am), am).logits[:, -1].float()
        u = torch.rand(logits.shape, generator=g)
        tok = (torch.softmax(logits / 0.8, -1) / -u.clamp(min=1e-38).log()).argmax(-1)
        seq, am = torch.cat([seq, tok[:, None]], 1), torch.cat([am, torch.ones_like(am[:, :1])], 1)
    assert torch.equal(out.tokens, seq[:, ids.shape[1]:])
    logits, u = torch.randn(64, 96), torch.rand(64, 96)
    want = (torch.softmax(logits / 0.7, -1) / -u.clamp(min=1e-38).log()).argmax(-1)
    tok, _ = sample_token(logits, temperature=0.7, top_k=0, top_p=1.0, uniform=u.clone())
    assert torch.equal(tok, want)


def test_greedy_rows_decode_greedily_inside_a_sampled_batch():
    # greedy_rows: the flagged rows equal a greedy generation of their prompts, every other row equals
    # the sampled generation without the flag (each row's token depends only on its own noise)
    m = model()
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11], [3]], pad_id=0)
    common = dict(max_new_tokens=10, pad_id=0, num_samples=4, temperature=0.9, top_p=0.95)
    flags = torch.arange(12) % 4 == 0
    mixed = generate(m, ids, mask, generator=torch.Generator().manual_seed(5), greedy_rows=flags, **common)
    sampled = generate(m, ids, mask, generator=torch.Generator().manual_seed(5), **common)
    greedy = generate(m, ids, mask, max_new_tokens=10, pad_id=0)
    assert torch.equal(mixed.tokens[flags], greedy.tokens)
    assert torch.equal(mixed.tokens[~flags], sampled.tokens[~flags])
    assert not torch.equal(sampled.tokens[flags], greedy.tokens)  # the flag did change those rows
    assert torch.allclose(mixed.logprobs[~flags], sampled.logprobs[~flags], atol=1e-6)
    # the flagged rows' log-probs are those of their tokens under the tempered distribution, as sampled rows'
    am = torch.cat([mask.repeat_interleave(4, 0), mixed.mask], 1)
    with torch.no_grad():
        full = m(mixed.sequences, positions_from_mask(am), am).logits[:, ids.shape[1] - 1: -1].float() / 0.9
    want = torch.log_softmax(full, -1).gather(-1, mixed.tokens[..., None])[..., 0] * mixed.mask
    assert torch.allclose(mixed.logprobs[flags], want[flags], atol=1e-4)


def test_grouped_decode_attention_equals_sdpa():
    # the reduced-precision CPU decode step's attention: query heads stacked per kv head, two matmuls.
    # fp32: SDPA's result to rounding; bf16/fp16: no further from the fp32 result than SDPA's own
    import torch.nn.functional as F

    from minitune.model import grouped_decode_attention

    torch.manual_seed(0)
    for B, H, KV, S in ((3, 4, 2, 20), (5, 9, 3, 77), (2, 4, 4, 33)):
        q, k, v = torch.randn(B, H, 1, 16), torch.randn(B, KV, S, 16), torch.randn(B, KV, S, 16)
        mask = torch.rand(B, 1, 1, S) > 0.4
        mask[..., 3] = True
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=KV != H)
        assert torch.allclose(grouped_decode_attention(q, k, v, mask), ref, atol=2e-6)
        for dt in (torch.bfloat16, torch.float16):
            low = [t.to(dt) for t in (q, k, v)]
            got = grouped_decode_attention(*low, mask)
            assert got.dtype == dt
            sdpa_err = (F.scaled_dot_product_attention(*low, attn_mask=mask, enable_gqa=KV != H).float() - ref).abs().max()
            assert (got.float() - ref).abs().max() <= 2 * sdpa_err + 1e-3, (dt, B, H, KV, S)


def test_bf16_static_decode_tracks_recompute():
    # a bf16 model on CPU decodes through grouped_decode_attention; its greedy log-probs stay within bf16
    # rounding of one forward pass over the whole sequence (plain SDPA)
    for n_kv in (2, 4):
        m = lora_generation_model(n_kv).to(torch.bfloat16)
        ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11], [3]], pad_id=0)
        with torch.no_grad():
            a = generate(m, ids, mask, max_new_tokens=8, pad_id=0)
            full = m(a.sequences, positions_from_mask(torch.cat([mask, torch.ones_like(a.tokens)], 1)),
                     torch.cat([mask, torch.ones_like(a.tokens)], 1)).logits.float()
        P = ids.shape[1]
        lp = torch.log_softmax(full[:, P - 1:-1], -1).gather(-1, a.tokens[:, :, None])[..., 0]
        assert torch.allclose(a.logprobs, lp, atol=0.05), (a.logprobs - lp).abs().max()
