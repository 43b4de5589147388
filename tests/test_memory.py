"""The memory predictor: its activation term equals what autograd keeps, and runs that cannot fit are
refused before they start."""
import pytest
import torch

from minitune import MinituneError, build_model
from minitune.lora import LoRAConfig, apply_lora
from minitune.memory import MemoryPlan, check_fits, estimate
from minitune.model import ModelConfig

SHAPES = [dict(hidden_size=96, intermediate_size=256, num_attention_heads=6, num_key_value_heads=2),
          dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=4)]


def saved_bytes(model, ids) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for the backward of one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, return_logits=False)
    del out
    return sum(kept.values())


@pytest.mark.parametrize("shape", SHAPES)
def test_predicted_activations_equal_what_autograd_keeps(shape):
    cfg = ModelConfig(vocab_size=64, num_hidden_layers=3, max_position_embeddings=512, **shape)
    model = build_model(cfg, seed=0)
    apply_lora(model, LoRAConfig(r=8, alpha=16))
    ids = torch.randint(0, 64, (2, 128))
    measured = saved_bytes(model, ids)
    plan = MemoryPlan(batch=2, seq=128, lora=LoRAConfig(r=8, alpha=16), dtype=torch.float32, device="cpu")
    predicted = estimate(cfg, plan)["activations"]
    assert abs(predicted / measured - 1) < 0.05, (predicted, measured)


def test_a_run_that_cannot_fit_is_refused_with_the_fix(monkeypatch):
    import minitune.memory as mem

    cfg = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32)
    monkeypatch.setattr(mem, "available_bytes", lambda device: 8 * 2**30)
    plan = MemoryPlan(batch=8, seq=4096, dtype=torch.bfloat16, device="cpu")
    with pytest.raises(MinituneError, match="lower run.batch_size or data.seq_length"):
        check_fits(cfg, plan, report=None)
    assert check_fits(cfg, plan, enforce=False, report=None)["peak"] > 8 * 2**30
    # checkpointing + the fused loss shrink what the step holds
    small = MemoryPlan(batch=8, seq=4096, dtype=torch.bfloat16, device="cpu", gradient_checkpointing=True, ce_chunk=256)
    assert estimate(cfg, small)["activations"] < estimate(cfg, plan)["activations"] / 10
    assert estimate(cfg, small)["logits"] < estimate(cfg, plan)["logits"] / 50
