"""LoRA component properties, quantized bases, merging and bad input (tiny models)."""
import pytest
import torch
import torch.nn.functional as F

from minitune import MinituneError, load_model
from minitune.activations import apply_activation_checkpointing
from minitune.lora import (LoRAConfig, LoRAInit, LoRALinear, apply_lora, disable_adapters, lora_parameters,
                           merge_adapter, merge_for_export, set_adapter, unmerge_adapter)
from minitune.quant import Linear4bit, Linear8bit, QuantConfig, prepare_for_kbit_training
from helpers import make_hf_model

ALL = LoRAConfig(r=4, alpha=8, target_modules="all-linear")


@pytest.fixture
def folder(tmp_path):
    make_hf_model("llama2").save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            if p.shape[1] == 4:  # B is [out, r]
                p.normal_(0, 0.05, generator=g)


def lm_loss(model, ids):
    logits = model(ids[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def test_zero_b_leaves_logits_unchanged(folder):
    base = load_model(folder)
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        ref = base(ids).logits
    counts = apply_lora(base, ALL)
    assert 0 < counts["trainable"] < counts["total"]
    with torch.no_grad():
        assert torch.equal(base(ids).logits, ref)


def test_only_lora_trains_and_base_is_bit_identical(folder):
    model = load_model(folder)
    apply_lora(model, ALL)
    base_before = {k: v.clone() for k, v in model.state_dict().items() if "adapters" not in k}
    lora_before = [p.clone() for p in lora_parameters(model)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 24))
    for _ in range(3):
        loss = lm_loss(model.train(), ids)
        loss.backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None}
        assert grads and all(".adapters.default.lora_" in n for n in grads)
        opt.step()
        opt.zero_grad()
    for k, v in model.state_dict().items():
        if k in base_before:
            assert torch.equal(v, base_before[k]), k
    assert all(not torch.equal(a, b) for a, b in zip(lora_before, lora_parameters(model)))


def test_trainable_selection_is_by_type_not_name(folder):
    model = load_model(folder)
    apply_lora(model, LoRAConfig(r=2, target_modules=("q_proj", "v_proj")))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora_parameters(model)}
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4


def test_merge_equals_unmerged_and_unmerge_restores(folder):
    model = load_model(folder)
    w0 = model.model.layers[0].mlp.down_proj.weight.clone()
    apply_lora(model, ALL)
    randomize_b(model)
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        unmerged = model(ids).logits
        merge_adapter(model)
        merged = model(ids).logits
        layer = model.model.layers[0].mlp.down_proj
        delta = layer.adapters["default"].delta_weight()
        assert torch.allclose(layer.base_layer.weight, w0 + delta, atol=1e-6)  # W' = W + s*B@A
        unmerge_adapter(model)
        again = model(ids).logits
    assert (merged - unmerged).abs().max() <= 1e-5
    assert torch.allclose(model.model.layers[0].mlp.down_proj.base_layer.weight, w0, atol=1e-6)
    assert (again - unmerged).abs().max() <= 1e-5


def test_rslora_scale_and_gaussian_init():
    cfg = LoRAConfig(r=16, alpha=32, rslora=True, init=LoRAInit.GAUSSIAN)
    assert cfg.scale == pytest.approx(32 / 4)
    lin = LoRALinear(torch.nn.Linear(64, 32))
    a = lin.add_adapter("x", cfg)
    assert torch.equal(a.lora_B, torch.zeros(32, 16))
    assert 0.03 < a.lora_A.std().item() < 0.1  # N(0, 1/r)


def test_named_adapters_switch_and_disable(folder):
    model = load_model(folder)
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        base = model(ids).logits
    apply_lora(model, ALL, "one")
    randomize_b(model, seed=1)
    with torch.no_grad():
        one = model(ids).logits
    apply_lora(model, ALL, "two")
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.adapters["two"].lora_B.normal_(0, 0.05)
        two = model(ids).logits
        set_adapter(model, "one")
        assert torch.equal(model(ids).logits, one)
        set_adapter(model, "two")
        assert torch.equal(model(ids).logits, two)
        with disable_adapters(model):
            assert torch.equal(model(ids).logits, base)
        assert torch.equal(model(ids).logits, two)
    assert not torch.equal(one, two)


def few_steps_loss_drop(folder, quant, lr: float) -> float:
    """First minus last loss of 8 AdamW steps of all-linear LoRA on one fixed batch."""
    torch.manual_seed(0)
    model = load_model(folder, quant=quant)
    if quant is not None:
        prepare_for_kbit_training(model)
        expected = Linear8bit if quant.quant_type.value == "int8" else Linear4bit
        assert isinstance(model.model.layers[0].self_attn.q_proj, expected)
    apply_lora(model, LoRAConfig(r=8, alpha=16, target_modules="all-linear"))
    apply_activation_checkpointing(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        loss = lm_loss(model.train(), ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses[0] - losses[-1]


# Measured drop on this project's CPU: 0.249 (fp32, int8, nf4), 0.252 (fp4); lr=0 gives exactly 0.
# The assertion asks for a fifth of it.
MIN_DROP = 0.05
QUANTS = [None, QuantConfig(quant_type="int8"), QuantConfig(compute_dtype="float32"),
          QuantConfig(quant_type="fp4", double_quant=False, compute_dtype="float32")]


@pytest.mark.parametrize("quant", QUANTS, ids=["fp32", "int8", "nf4", "fp4"])
def test_few_steps_lower_the_loss_on_every_base(folder, quant):
    assert few_steps_loss_drop(folder, quant, lr=3e-3) > MIN_DROP


@pytest.mark.parametrize("quant", [QUANTS[0], QUANTS[2]], ids=["fp32", "nf4"])
def test_few_steps_control_at_lr0_fails_the_same_assertion(folder, quant):
    assert not few_steps_loss_drop(folder, quant, lr=0.0) > MIN_DROP


def test_qlora_first_step_loss_close_to_full_precision(folder):
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = {}
    for name, quant in [("fp32", None), ("nf4", QuantConfig(compute_dtype="float32")), ("int8", QuantConfig(quant_type="int8"))]:
        model = load_model(folder, quant=quant)
        apply_lora(model, ALL)
        with torch.no_grad():
            losses[name] = lm_loss(model, ids).item()
    # Stated tolerance: NF4 on N(0, 0.02) weights moves the random-model loss by < 1%, int8 by < 0.5%.
    assert abs(losses["nf4"] - losses["fp32"]) / losses["fp32"] < 0.01, losses
    assert abs(losses["int8"] - losses["fp32"]) / losses["fp32"] < 0.005, losses


@pytest.mark.parametrize("quant", [QuantConfig(compute_dtype="float32"), QuantConfig(quant_type="int8")], ids=["nf4", "int8"])
def test_quantized_merge_for_export(folder, quant):
    model = load_model(folder, quant=quant)
    apply_lora(model, ALL)
    randomize_b(model)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        unmerged = model(ids).logits
    with pytest.raises(MinituneError, match="quantized base"):
        merge_adapter(model)
    merge_for_export(model)
    assert not any(isinstance(m, (LoRALinear, Linear4bit, Linear8bit)) for m in model.modules())
    with torch.no_grad():
        merged = model(ids).logits
    # Merged into the dequantized weights: equal to the 4-bit model up to float rounding. int8
    # differs more because LLM.int8() also quantizes activations at run time.
    tol = 1e-4 if quant.quant_type.value == "nf4" else 2e-2
    assert (merged - unmerged).abs().max() <= tol


def test_unknown_target_lists_available(folder):
    model = load_model(folder)
    with pytest.raises(MinituneError, match=r"\['qq_proj'\] not found; available linear names: \['down_proj'"):
        apply_lora(model, LoRAConfig(target_modules=("qq_proj",)))


@pytest.mark.parametrize("kwargs,field", [({"r": 0}, "lora.r"), ({"alpha": 0}, "lora.alpha"), ({"dropout": 1.5}, "lora.dropout")])
def test_bad_lora_config(kwargs, field):
    with pytest.raises(MinituneError, match=field):
        LoRAConfig(**kwargs)


def test_quantized_loading_streams_layer_by_layer(folder):
    # Every linear is replaced on the meta model before any tensor is read; no fp32 weight of a
    # quantized layer survives the load.
    model = load_model(folder, quant=QuantConfig(compute_dtype="float32"))
    for name, p in model.named_parameters():
        assert p.device.type == "cpu", name
    packed = model.model.layers[0].mlp.up_proj.weight
    assert packed.dtype == torch.uint8 and packed.numel() == 64 * 128 // 2


def test_quant_storage_bfloat16_matches_uint8(folder):
    ids = torch.randint(0, 128, (1, 16))
    a = load_model(folder, quant=QuantConfig(compute_dtype="float32"))
    b = load_model(folder, quant=QuantConfig(compute_dtype="float32", quant_storage="bfloat16"))
    assert b.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_lora_update_inside_addmm_equals_the_plain_expression():
    """add_to folds scale * (x A^T) B^T into the base output's GEMM; it must equal y + forward(x),
    in value and in the gradients of A, B and x, for 3-D inputs; dropout keeps the plain path."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(12, 10, bias=True).requires_grad_(False))
    layer.add_adapter("a", LoRAConfig(r=4, alpha=8))
    layer.active = "a"
    ad = layer.adapters["a"]
    torch.nn.init.normal_(ad.lora_B)  # B = 0 at init would hide a wrong product
    x = torch.randn(2, 5, 12, requires_grad=True)
    out = layer(x)
    ref = layer.base_layer(x) + (x @ ad.lora_A.t() @ ad.lora_B.t()) * ad.scale
    wrt = (x, ad.lora_A, ad.lora_B)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, wrt, g), torch.autograd.grad(ref, wrt, g)):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(out, ref, atol=1e-5) and out.shape == (2, 5, 10)
    drop = LoRALinear(torch.nn.Linear(12, 10).requires_grad_(False))
    drop.add_adapter("a", LoRAConfig(r=4, alpha=8, dropout=0.5)).eval()
    drop.active = "a"
    torch.nn.init.normal_(drop.adapters["a"].lora_B)
    da = drop.adapters["a"]
    assert torch.allclose(drop(x), drop.base_layer(x) + (x @ da.lora_A.t() @ da.lora_B.t()) * da.scale, atol=1e-5)
