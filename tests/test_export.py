"""recipes/merge_adapter.py: the merged folder loads in transformers with the unmerged model's logits."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from minitune import load_model, load_tokenizer
from minitune.adapters import load_adapter, save_adapter
from minitune.lora import LoRAConfig, LoRALinear, apply_lora
from minitune.quant import QuantConfig
from helpers import load_recipe, tiny_with_real_tokenizer

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_merged_export_matches_unmerged(demo_dir, tmp_path, quant):
    tiny = tiny_with_real_tokenizer(tmp_path / "base", demo_dir)
    qcfg = QuantConfig(compute_dtype="float32") if quant == "nf4" else None
    trained = load_model(tiny, quant=qcfg)
    apply_lora(trained, LoRAConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for m in trained.modules():
            if isinstance(m, LoRALinear):
                m.adapters["default"].lora_B.normal_(0, 0.05)
    save_adapter(trained, tmp_path / "adapter")
    load_recipe("merge_adapter").merge(str(tiny), str(tmp_path / "adapter"), str(tmp_path / "merged"), quant=quant)

    ids = torch.randint(0, 49152, (2, 16))
    unmerged = load_model(tiny, quant=qcfg)
    load_adapter(unmerged, tmp_path / "adapter")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(ids).logits - unmerged(ids).logits).abs().max().item() <= 1e-4
    assert load_tokenizer(tmp_path / "merged").encode("hello") == load_tokenizer(tiny).encode("hello")
