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
