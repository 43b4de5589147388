"""Adapters exchanged with peft in both directions give the same logits (fp32 and NF4 bases)."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from minitune import MinituneError, load_model
from minitune.adapters import load_adapter, save_adapter
from minitune.lora import LoRAConfig, LoRALinear, apply_lora
from minitune.quant import QuantConfig
from helpers import make_hf_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_base(folder, nf4: bool):
    kw = {}
    if nf4:
        kw = dict(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32), device_map="cpu")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    return exact_bnb_cpu_path(model)


def exact_bnb_cpu_path(model):
    """Keeps bitsandbytes' `nn.Linear4bit` on its exact path on every CPU.

    On a CPU with AVX512-BF16, `Linear4bit.forward` in eval mode without grad repacks the weight for
    a bf16 kernel (`_convert_weight_packed_for_cpu`: absmax rounded to bf16, product in bf16) whatever
    `compute_dtype` says. The packed NF4 bytes and quant state are the same as minitune's (see
    test_quantized_layers_equal_bitsandbytes_on_the_stored_weights); only that inference kernel
    differs, so the comparison would depend on the CPU it runs on (logit gaps of 2e-3 on the tiny
    model and ~0.8 on SmolLM2 where the flag is set, 0 where it is not). Training (and any forward
    with grad) always takes the exact path, the one minitune computes.
    """
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def mt_base(folder, nf4: bool):
    return load_model(folder, quant=QuantConfig(compute_dtype="float32") if nf4 else None)


def randomize(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for a in m.adapters.values():
                    a.lora_A.normal_(0, 0.1, generator=g)
                    a.lora_B.normal_(0, 0.1, generator=g)


def roundtrip(folder, tmp_path, ids, nf4, tol, rslora=False):
    # minitune -> peft
    ours = mt_base(folder, nf4)
    apply_lora(ours, LoRAConfig(r=8, alpha=16, target_modules="all-linear", rslora=rslora))
    randomize(ours)
    save_adapter(ours, tmp_path / "mt_adapter", base_model_name_or_path=str(folder))
    cfg = json.loads((tmp_path / "mt_adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["bias"] == "none"
    peft_model = PeftModel.from_pretrained(hf_base(folder, nf4), tmp_path / "mt_adapter").eval()
    with torch.no_grad():
        a, b = ours(ids).logits, peft_model(ids).logits
    assert (a - b).abs().max().item() <= tol

    # peft -> minitune
    hf = get_peft_model(hf_base(folder, nf4), LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS[:4],
                                                           use_rslora=rslora, init_lora_weights="gaussian"))
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "peft_adapter")
    mine = mt_base(folder, nf4)
    load_adapter(mine, tmp_path / "peft_adapter")
    with torch.no_grad():
        assert (mine(ids).logits - hf.eval()(ids).logits).abs().max().item() <= tol


@pytest.mark.parametrize("nf4", [False, True], ids=["fp32", "nf4"])
def test_tiny_roundtrip_with_peft(tmp_path, nf4):
    make_hf_model("llama2").save_pretrained(tmp_path / "base")
    ids = torch.randint(0, 128, (2, 24))
    roundtrip(tmp_path / "base", tmp_path, ids, nf4, tol=1e-4, rslora=nf4)


@pytest.mark.slow
@pytest.mark.parametrize("nf4", [False, True], ids=["fp32", "nf4"])
def test_real_smollm2_roundtrip_with_peft(demo_dir, demo_tok, tmp_path, nf4):
    text = demo_tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True)
    ids = torch.tensor([demo_tok.encode(text)])
    # 30 layers of a 4-bit base amplify attention-kernel rounding: max |diff| 3.3e-4 on torch 2.13 (both libraries
    # on SDPA's flash kernel), 1.3e-3 on torch 2.6 (transformers' grouped K/V go to the math kernel there, ours not).
    roundtrip(demo_dir, tmp_path, ids, nf4, tol=2e-3 if nf4 else 1e-3)


def test_quantized_layers_equal_bitsandbytes_on_the_stored_weights(tmp_path):
    # The reference is bitsandbytes itself applied to the checkpoint's stored tensor: same packed
    # bytes, absmax and nested (double-quant) state, and the same forward as matmul_4bit.
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    from minitune.checkpoint import iter_safetensors
    from minitune.quant import Linear4bit

    make_hf_model("llama2").save_pretrained(tmp_path / "base")
    stored = dict(iter_safetensors(tmp_path / "base" / "model.safetensors"))
    for quant_type in ("nf4", "fp4"):
        model = load_model(tmp_path / "base", quant=QuantConfig(quant_type=quant_type, compute_dtype="float32"))
        layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
        assert len(layers) == 14
        for name, layer in layers.items():
            ref, ref_state = bnbF.quantize_4bit(stored[name + ".weight"], blocksize=64, compress_statistics=True,
                                                quant_type=quant_type)
            assert torch.equal(layer.weight.data.view(torch.uint8), ref.view(torch.uint8)), name
            got = layer.quant_state
            assert torch.equal(got.absmax, ref_state.absmax) and torch.equal(got.offset, ref_state.offset)
            assert torch.equal(got.state2.absmax, ref_state.state2.absmax)
            assert got.dtype == stored[name + ".weight"].dtype == torch.float32
            x = torch.randn(3, layer.in_features)
            expected = bnb.matmul_4bit(x, ref.t(), quant_state=ref_state)
            assert torch.equal(layer(x), expected)
            assert torch.allclose(expected, x @ bnbF.dequantize_4bit(ref, ref_state).t(), atol=1e-5)


def test_saved_adapter_has_every_key_non_empty(tmp_path):
    make_hf_model("llama2").save_pretrained(tmp_path / "base")
    model = load_model(tmp_path / "base")
    apply_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    save_adapter(model, tmp_path / "a")
    from minitune.checkpoint import iter_safetensors

    sd = dict(iter_safetensors(tmp_path / "a" / "adapter_model.safetensors"))
    assert len(sd) == 2 * 7 * 2  # A and B for 7 linears in 2 layers
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in sd
    assert all(v.numel() > 0 for v in sd.values())


def test_adapter_for_other_architecture_or_rank_is_refused(tmp_path):
    make_hf_model("llama2").save_pretrained(tmp_path / "base")
    model = load_model(tmp_path / "base")
    apply_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    save_adapter(model, tmp_path / "a")
    # a wider base: shapes do not fit
    wide = make_hf_model("llama2")
    cfg = wide.config.to_dict()
    cfg["intermediate_size"] = 96
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(tmp_path / "wide")
    with pytest.raises(MinituneError, match="do not fit this base"):
        load_adapter(load_model(tmp_path / "wide"), tmp_path / "a")
    # a config whose r disagrees with the tensors
    j = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    j["r"] = 8
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(j))
    with pytest.raises(MinituneError, match="r=8"):
        load_adapter(load_model(tmp_path / "base"), tmp_path / "a")
