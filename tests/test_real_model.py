"""The real SmolLM2-135M-Instruct against transformers: logits, greedy generation, GGUF import."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from minitune import generate, load_model
from minitune.gguf_import import unpermute_qk

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


@pytest.fixture(scope="module")
def hf_model(demo_dir):
    return AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()


def chat_ids(tok, text):
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))


def test_logits_match_transformers(demo_model, demo_tok, hf_model):
    ids = torch.tensor([chat_ids(demo_tok, PROMPTS[0])])
    with torch.no_grad():
        diff = (demo_model(ids).logits - hf_model(ids).logits).abs().max().item()
    assert diff <= 1e-3


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_generation_matches_transformers(demo_model, demo_tok, hf_model, prompt):
    ids = torch.tensor([chat_ids(demo_tok, prompt)])
    ours = generate(demo_model, ids, max_new_tokens=32, eos_ids=demo_tok.eos_ids, pad_id=demo_tok.pad_id)
    ref = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
    n = int(ours.lengths[0])
    assert ours.tokens[0, :n].tolist() == ref[0, ids.shape[1]:].tolist()


def test_gguf_import_matches_transformers_gguf(demo_gguf, demo_tok):
    ours = load_model(demo_gguf)
    ref = AutoModelForCausalLM.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([chat_ids(demo_tok, PROMPTS[1])])
    with torch.no_grad():
        assert (ours(ids).logits - ref(ids).logits).abs().max().item() <= 1e-3


def test_unpermute_inverts_llama_cpp_permute():
    # llama.cpp's converter: reshape(n_head, 2, half, in).swapaxes(1, 2)
    w = torch.arange(8 * 6 * 3, dtype=torch.float32).reshape(48, 3).numpy()
    permuted = w.reshape(8, 2, 3, 3).swapaxes(1, 2).reshape(w.shape)
    assert (unpermute_qk(permuted, 8) == w).all()


def test_without_unpermute_the_logits_differ(demo_gguf, demo_model, demo_tok, monkeypatch):
    import minitune.gguf_import as gi

    monkeypatch.setattr(gi, "unpermute_qk", lambda w, n: w)
    wrong = load_model(demo_gguf)
    ids = torch.tensor([chat_ids(demo_tok, PROMPTS[0])])
    with torch.no_grad():
        assert (wrong(ids).logits - demo_model(ids).logits).abs().max().item() > 1.0
