"""Packed-block attention: every path isolates documents and gives the same outputs and gradients."""
import random

import pytest
import torch

from minitune import MinituneError, build_model
from minitune.attention import AttentionImpl, Segments, set_attention
from minitune.data import ConstantLengthDataset, Document
from minitune.lora import LoRAConfig, apply_lora
from minitune.model import ModelConfig

PATHS = [AttentionImpl.SDPA, AttentionImpl.SEGMENTS, AttentionImpl.FLEX]


def cfg(n_kv: int) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=512)


def packed_batch(n_docs=60, seq=96, rows=3, seed=0):
    """`rows` blocks of ConstantLengthDataset output (the last one padded at its end)."""
    rng = random.Random(seed)
    docs = [{"ids": [rng.randrange(3, 64) for _ in range(rng.randint(2, 30))] + [2]} for _ in range(n_docs)]

    def fmt(rs):
        return [Document(list(r["ids"]), [True] * len(r["ids"])) for r in rs], 0

    blocks = list(ConstantLengthDataset(docs, fmt, seq_length=seq, shard=(0, 1), drop_last=False))
    blocks = blocks[:rows - 1] + blocks[-1:]
    assert (blocks[-1]["labels"] == -100).sum() > 3, "the last block should end in padding"
    return {k: torch.stack([b[k] for b in blocks]) for k in blocks[0]}


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("n_kv", [4, 2])
@pytest.mark.parametrize("impl", PATHS)
def test_packed_documents_equal_each_document_alone(impl, n_kv):
    model = set_attention(build_model(cfg(n_kv), seed=0).eval(), impl)
    batch = packed_batch()
    ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
    with torch.no_grad():
        packed = model(ids, pos).logits
    checked = 0
    for b in range(ids.shape[0]):
        real = int((labels[b] != -100).nonzero().max()) + 1  # documents before the padded tail
        starts = [0] + [t for t in range(1, real) if pos[b, t] <= pos[b, t - 1]] + [real]
        for s, e in zip(starts[:-1], starts[1:]):
            with torch.no_grad():
                alone = model(ids[b:b + 1, s:e], pos[b:b + 1, s:e]).logits[0]
            assert (packed[b, s:e] - alone).abs().max().item() <= 1e-5, (impl, b, s, e)
            checked += 1
    assert checked > 10


@pytest.mark.parametrize("n_kv", [4, 2])
def test_every_path_gives_the_same_logits_and_lora_gradients(n_kv):
    batch = packed_batch(seed=1)
    results = {}
    for impl in PATHS if torch.cuda.is_available() else PATHS[:2]:  # flex_attention has no CPU backward
        torch.manual_seed(0)
        model = set_attention(build_model(cfg(n_kv), seed=0), impl)
        apply_lora(model, LoRAConfig(r=4, alpha=8))
        for n, p in model.named_parameters():  # B = 0 at init would hide the attention's gradient path
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(n)))
        logits = model(batch["input_ids"], batch["position_ids"]).logits
        keep = batch["labels"] != -100
        loss = torch.nn.functional.cross_entropy(logits[keep], batch["labels"][keep])
        loss.backward()
        results[impl] = (logits[keep].detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    ref_logits, ref_grads = results[AttentionImpl.SDPA]
    for impl in results.keys() - {AttentionImpl.SDPA}:
        logits, grads = results[impl]
        assert (logits - ref_logits).abs().max() < 1e-5, impl
        worst = max((grads[n] - g).abs().max().item() / (g.abs().max().item() + 1e-12) for n, g in ref_grads.items())
        assert worst < 1e-4, (impl, worst)


def test_segments_merge_padding_runs_and_keep_document_lengths():
    pos = torch.tensor([[3, 4, 0, 1, 2, 0, 0, 0], [0, 1, 2, 3, 4, 5, 6, 7]])
    segs = Segments.from_positions(pos)
    assert segs.rows == (((0, 2), (2, 3), (5, -3)), ((0, 8),))


def test_unpacked_and_padded_inputs_take_the_dense_or_causal_path():
    model = set_attention(build_model(cfg(2), seed=0).eval(), AttentionImpl.SEGMENTS)
    ids = torch.randint(3, 64, (2, 10))
    ref = set_attention(build_model(cfg(2), seed=0).eval(), AttentionImpl.SDPA)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0  # left padding: the dense mask handles it on every path
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        for kw in ({}, {"attention_mask": mask, "position_ids": pos}):
            assert torch.equal(model(ids, **kw).logits, ref(ids, **kw).logits)


def test_unknown_attention_impl_is_refused_by_name():
    with pytest.raises(MinituneError, match="model.attention must be one of"):
        set_attention(build_model(cfg(2), seed=0), "flash")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_training_through_flex_on_cpu_is_refused_before_the_forward():
    model = set_attention(build_model(cfg(2), seed=0), AttentionImpl.FLEX)
    batch = packed_batch()
    with pytest.raises(MinituneError, match="model.attention=flex trains only on CUDA"):
        model(batch["input_ids"], batch["position_ids"])


# -- grouped K/V (GQA) through SDPA ----------------------------------------------------------------


def _sdpa_calls(monkeypatch):
    """Records the arguments of every F.scaled_dot_product_attention call made by minitune.attention."""
    import minitune.attention as att

    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(att.F, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("masked", [False, True])
def test_grouped_kv_never_sends_sdpa_to_its_math_kernel(monkeypatch, masked):
    """Whatever this torch's kernels take, `sdpa` hands grouped K/V to a fused kernel (on CPU before torch 2.9
    `enable_gqa` meant the math kernel, which keeps [B, nh, T, T] scores for the backward), and its output
    and gradients equal attention over K/V repeated to every head."""
    from torch.nn.attention import SDPBackend

    from minitune.attention import sdpa

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 40, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 40, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 40, 16, generator=g, requires_grad=True)
    mask = torch.ones(40, 40, dtype=torch.bool).tril()[None, None].expand(2, 1, 40, 40) if masked else None
    calls = _sdpa_calls(monkeypatch)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = sdpa(q, k, v, attn_mask=mask, is_causal=not masked)
    (args, kwargs), = calls
    assert torch._fused_sdp_choice(*args, **kwargs) != int(SDPBackend.MATH)
    assert (2, 6, 40, 40) not in saved, "the T x T scores were kept for the backward"
    ref_q, ref_k, ref_v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(
        ref_q, ref_k.repeat_interleave(3, 1), ref_v.repeat_interleave(3, 1), attn_mask=mask, is_causal=not masked)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(out.shape, generator=g)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for a, b in ((q, ref_q), (k, ref_k), (v, ref_v)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_repeated_kv_path_equals_the_grouped_kernel_in_the_model(monkeypatch):
    """The model's logits and LoRA gradients, and its static decode, are the same whether SDPA takes grouped K/V
    itself or gets them repeated (what `gqa_in_kernel` decides per torch version and device)."""
    import minitune.attention as att
    import minitune.model as mdl
    from minitune.generate import generate

    def run():
        torch.manual_seed(0)
        model = build_model(cfg(2), seed=0)
        apply_lora(model, LoRAConfig(r=4, alpha=8, init="gaussian"))
        ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
        logits = model(ids).logits
        logits.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            tokens = generate(model, ids[:, :8], max_new_tokens=6).tokens
        return logits.detach(), grads, tokens

    grouped = run()
    monkeypatch.setattr(att, "gqa_in_kernel", lambda *a: False)
    monkeypatch.setattr(mdl, "gqa_in_kernel", lambda *a: False)
    repeated = run()
    torch.testing.assert_close(repeated[0], grouped[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(repeated[1], grouped[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(repeated[2], grouped[2])
