"""Logit parity with transformers for every supported family, both directions of checkpoint exchange."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from minitune import load_model, save_model
from minitune.model import ModelConfig, rope_inv_freq
from helpers import FAMILIES, make_hf_model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(tmp_path, family):
    hf = make_hf_model(family)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids).logits
    assert out.shape == ref.shape == (2, 40, 128)
    assert (out - ref).abs().max().item() <= 1e-4

    # save_model -> transformers loads the folder with the same logits
    save_model(ours, tmp_path / "mt")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "mt", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (back(ids).logits - ref).abs().max().item() <= 1e-4


def test_tied_embeddings_are_shared(tmp_path):
    hf = make_hf_model("smollm2")
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_explicit_positions_and_hidden_states(tmp_path):
    hf = make_hf_model("llama2")
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    ids = torch.randint(0, 128, (1, 12))
    pos = torch.arange(5, 17)[None]
    with torch.no_grad():
        ref = hf(ids, position_ids=pos, output_hidden_states=True)
        out = ours(ids, position_ids=pos)
    assert (out.logits - ref.logits).abs().max() <= 1e-4
    assert (out.hidden - ref.hidden_states[-1]).abs().max() <= 1e-4
    with torch.no_grad():
        tail = ours(ids, position_ids=pos, logits_from=7)  # PPO skips the prompt's logits
    assert tail.logits.shape == (1, 5, out.logits.shape[-1])
    assert torch.allclose(tail.logits, out.logits[:, 7:], atol=1e-6) and torch.equal(tail.hidden, out.hidden)


def test_llama3_rope_scaling_changes_low_frequencies_only():
    base = ModelConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0)
    scaled = ModelConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})
    a, b = rope_inv_freq(base), rope_inv_freq(scaled)
    assert torch.equal(a[0], b[0])  # highest frequency untouched
    assert torch.allclose(b[-1], a[-1] / 8.0)  # lowest divided by the factor


def test_sharded_save_roundtrip(tmp_path):
    hf = make_hf_model("llama2")
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    save_model(ours, tmp_path / "sharded", max_shard_bytes=20_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    again = load_model(tmp_path / "sharded")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours(ids).logits)
        assert (back(ids).logits - ours(ids).logits).abs().max() <= 1e-4
