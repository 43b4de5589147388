"""KV-cache generation: equals recomputation, handles left padding, stops per row, sane log-probs."""
import torch

from minitune import build_model, generate
from minitune.generate import filter_logits, left_pad
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
