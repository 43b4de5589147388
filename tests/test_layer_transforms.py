"""Transforms on the decoder layers: compiled (CPU inductor), checkpointed, checkpointed with the
kept inputs offloaded. Each gives the eager model's loss and LoRA gradients."""
import pytest
import torch

from minitune import build_model
from minitune.activations import apply_activation_checkpointing
from minitune.compile import compile_layers
from minitune.generate import generate
from minitune.lora import LoRAConfig, apply_lora
from minitune.model import ModelConfig
from minitune.quant import QuantConfig, quantize
from minitune.train.loss import cross_entropy_sum
from test_attention import packed_batch

CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own models from an empty dynamo cache: entries left by an earlier test's
    (freed) models crashed torch 2.6's frame evaluation in a later test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def lora_model(quant: bool = False):
    torch.manual_seed(0)
    model = build_model(CFG, seed=0)
    if quant:
        quantize(model, QuantConfig())
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    g = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():  # B = 0 at init would leave A's gradient zero
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1, generator=g)
    return model


def loss_and_grads(model, batch):
    out = model(batch["input_ids"], batch["position_ids"], return_logits=False)
    loss = cross_entropy_sum(out.hidden, batch["labels"], model.lm_head, 64) / (batch["labels"] != -100).sum()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(ref, got, tol):
    assert abs(ref[0] - got[0]) < tol
    assert ref[1].keys() == got[1].keys() and len(ref[1]) == 4 * 7
    for n, g in ref[1].items():
        assert (got[1][n] - g).abs().max().item() <= tol * max(1.0, g.abs().max().item()), n


@pytest.mark.parametrize("offload", [False, True])
def test_checkpointing_and_offloading_give_the_same_gradients(offload):
    batch = packed_batch()
    ref = loss_and_grads(lora_model(), batch)
    model = apply_activation_checkpointing(lora_model(), offload=offload)
    assert_same(ref, loss_and_grads(model, batch), 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["none", "checkpoint", "offload"])
def test_compiled_layers_give_the_eager_loss_and_lora_gradients(wrap):
    batch = packed_batch()  # packed: the per-document attention runs eagerly between compiled regions
    ref = loss_and_grads(lora_model(), batch)
    model = compile_layers(lora_model())
    if wrap != "none":
        apply_activation_checkpointing(model, offload=wrap == "offload")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert_same(ref, loss_and_grads(model, batch), 1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did run compiled
    # Parameter names (PEFT keys, checkpoints) do not change.
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in lora_model().named_parameters()]


@pytest.mark.slow
def test_compiled_layers_with_a_4bit_base():
    batch = packed_batch()
    ref = loss_and_grads(lora_model(quant=True), batch)
    assert_same(ref, loss_and_grads(compile_layers(lora_model(quant=True)), batch), 1e-4)


def test_generation_after_compile_takes_the_eager_layers():
    prompts = torch.randint(3, 64, (2, 5))
    eager = generate(lora_model().eval(), prompts, max_new_tokens=6, temperature=0.0)
    compiled_model = compile_layers(lora_model().eval())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = generate(compiled_model, prompts, max_new_tokens=6, temperature=0.0)
    assert torch.equal(eager.tokens, compiled.tokens)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0  # nothing was compiled under no_grad


def test_compile_must_come_before_checkpointing():
    model = apply_activation_checkpointing(lora_model())
    with pytest.raises(ValueError, match="before apply_activation_checkpointing"):
        compile_layers(model)
