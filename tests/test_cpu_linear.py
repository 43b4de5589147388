"""oneDNN-packed linear weights on CPU: the same products as F.linear, never a stale copy, gradients
untouched, generation unchanged (eager and compiled, LoRA on and off)."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import lora_generation_model
from minitune import generate
from minitune.cpu_linear import PackedLinear, available, is_plain_linear, pack_linears, packed_bytes, unpack_linears
from minitune.generate import left_pad

pytestmark = pytest.mark.skipif(not available(), reason="this torch build has no working oneDNN packed linear")


def mlp(bias=True, dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64, bias=bias), nn.ReLU(), nn.Linear(64, 16, bias=False)).to(dtype)


def plain(m, x):
    """The same network through F.linear on its current weights."""
    return F.linear(torch.relu(F.linear(x, m[0].weight, m[0].bias)), m[2].weight)


@pytest.mark.parametrize("dtype,bias,shape,tol", [
    (torch.float32, True, (5, 32), 1e-5), (torch.float32, False, (2, 3, 32), 1e-5), (torch.float32, True, (1, 32), 1e-5),
    (torch.bfloat16, True, (4, 32), 2e-2)])
def test_packed_products_equal_f_linear(dtype, bias, shape, tol):
    m = mlp(bias, dtype)
    x = torch.randn(*shape).to(dtype)
    assert pack_linears(m) == 2 and all(type(m[i]) is PackedLinear for i in (0, 2))
    assert packed_bytes(m) == (32 * 64 + 64 * 16) * x.element_size()
    with torch.no_grad():
        y = m(x)
    ref = plain(m, x)
    assert y.shape == ref.shape and y.dtype == dtype
    assert torch.allclose(y.float(), ref.float(), atol=tol, rtol=tol)
    assert m[0]._pack.packed is not None  # the packed path ran, not the fallback


def test_a_weight_changed_in_place_or_replaced_is_never_used_stale_eager_or_compiled():
    m = mlp()
    pack_linears(m)
    x = torch.randn(4, 32)
    f = torch.compile(lambda x: m(x), dynamic=False)
    with torch.no_grad():
        assert torch.allclose(f(x), plain(m, x), atol=1e-5)
        m[0].weight.mul_(2)  # an optimizer step, merge or load_state_dict: in place
        assert torch.allclose(f(x), plain(m, x), atol=1e-5)  # compiled: the op falls back to F.linear
        assert torch.allclose(m(x), plain(m, x), atol=1e-5)  # eager: repacked
        assert m[0]._pack.version == m[0].weight._version
        assert torch.allclose(f(x), plain(m, x), atol=1e-5)
        m[2].weight = nn.Parameter(torch.randn(16, 64))  # replaced
        assert torch.allclose(m(x), plain(m, x), atol=1e-5)
        assert m[2]._pack.src is m[2].weight


def test_gradients_take_the_plain_path_and_equal_an_unpacked_copy():
    m, ref = mlp(), mlp()
    pack_linears(m)
    x = torch.randn(6, 32)
    m(x).square().sum().backward()
    ref(x).square().sum().backward()
    for a, b in zip(m.parameters(), ref.parameters()):
        assert torch.equal(a.grad, b.grad)
    # input gradient through a frozen packed layer (LoRA's base): also the plain path
    m.requires_grad_(False)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    m(xa).sum().backward()
    plain(m, xb).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-6)


def test_state_dict_copies_pickles_and_unpack_keep_the_layer():
    m = mlp()
    keys = list(m.state_dict())
    pack_linears(m)
    assert list(m.state_dict()) == keys  # the packed copy is not state
    assert is_plain_linear(m[0]) and isinstance(m[0], nn.Linear)
    x = torch.randn(3, 32)
    for other in (copy.deepcopy(m), _roundtrip(m)):
        assert type(other[0]) is PackedLinear
        with torch.no_grad():
            assert torch.allclose(other(x), plain(m, x), atol=1e-5)
    assert unpack_linears(m) == 2 and type(m[0]) is nn.Linear and "_pack" not in m[0].__dict__
    assert pack_linears(m) == 2 and pack_linears(m) == 2  # idempotent


def test_inference_tensor_weights_are_left_unpacked():
    # weights made under inference_mode keep no version counter, so a change could not be detected
    with torch.inference_mode():
        m = mlp()
        x = torch.randn(3, 32)
        assert pack_linears(m) == 0 and type(m[0]) is nn.Linear
        assert torch.allclose(m(x), plain(m, x))


def _roundtrip(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_the_fused_loss_and_quantization_still_see_a_plain_linear():
    from minitune.quant import QuantConfig, is_quantized_linear, quantize
    from minitune.train.loss import fusable

    m = mlp(bias=False)
    pack_linears(m)
    assert fusable(m[0]) and fusable(m[2])
    q = quantize(m, QuantConfig(compute_dtype="float32"))
    assert is_quantized_linear(q[0]) and is_quantized_linear(q[2])


def test_generation_with_packed_weights_equals_unpacked_with_lora_on_and_off_eager_and_compiled():
    from minitune.lora import disable_adapters

    m = lora_generation_model()
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11], [3]], pad_id=0)
    common = dict(max_new_tokens=12, pad_id=0, num_samples=2, temperature=0.9, top_k=30)
    ref = {on: None for on in (True, False)}
    for on in (True, False):
        with torch.no_grad() if on else disable_adapters(m):
            ref[on] = generate(m, ids, mask, generator=torch.Generator().manual_seed(3), **common)
    n = pack_linears(m)
    assert n == 2 * 7 + 1  # every base projection inside the LoRA wrappers and the head
    for on in (True, False):
        for compile in (False, True):
            with torch.no_grad() if on else disable_adapters(m):
                out = generate(m, ids, mask, generator=torch.Generator().manual_seed(3), compile=compile, **common)
            assert torch.equal(out.sequences, ref[on].sequences), (on, compile)
            assert torch.allclose(out.logprobs, ref[on].logprobs, atol=1e-5)


def test_only_faster_packs_the_shapes_the_rule_says_pay(monkeypatch):
    """pack_linears(only_faster=True), as the recipes call it: a layer gets a copy only when the rule
    (`packing_pays`) says packing its shape pays; the others stay plain nn.Linear and give F.linear's results exactly."""
    import minitune.cpu_linear as cl

    asked = []
    monkeypatch.setattr(cl, "packing_pays", lambda o, i: asked.append((o, i)) or (o, i) == (64, 32))
    m = mlp()
    assert pack_linears(m, only_faster=True) == 1
    assert type(m[0]) is PackedLinear and type(m[2]) is nn.Linear
    assert asked == [(64, 32), (16, 64)]
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), plain(m, x), atol=1e-5, rtol=1e-5)
        assert torch.equal(m[2](m[1](m[0](x))), F.linear(m[1](m[0](x)), m[2].weight))  # plain layer: bitwise
    assert pack_linears(m, only_faster=True) == 1  # idempotent: a packed layer stays packed without asking again
    assert len(asked) == 3


def test_packing_pays_packs_every_shape_off_intel_and_only_output_projections_on_it(monkeypatch):
    import minitune.cpu_linear as cl

    monkeypatch.setattr(cl, "cpu_vendor", lambda: "AuthenticAMD")
    assert cl.packing_pays(192, 576) and cl.packing_pays(49152, 576)
    monkeypatch.setattr(cl, "cpu_vendor", lambda: "GenuineIntel")
    assert not cl.packing_pays(1536, 576) and not cl.packing_pays(2048, 4096)
    assert cl.packing_pays(49152, 576) and cl.packing_pays(128256, 4096)
    monkeypatch.undo()
    cl.cpu_vendor.cache_clear()
    assert isinstance(cl.cpu_vendor(), str)


def test_packed_layers_compile_without_graph_breaks():
    """A compiled no-grad pass through packed layers is one graph: a break in every layer (as
    `tensor.is_inference()` in the forward once caused) sent the compiled decode step back to eager
    layer by layer, slower than not compiling."""
    m = mlp()
    pack_linears(m)
    x = torch.randn(4, 32)
    with torch.no_grad():
        m(x)  # the eager pass makes the copies
        explained = torch._dynamo.explain(m)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch.testing.assert_close(torch.compile(m)(x), plain(m, x), atol=1e-5, rtol=1e-5)


def test_cpu_pack_asked_for_where_it_cannot_run_is_turned_off_with_a_note(monkeypatch):
    """model.cpu_pack=true with a torch whose packed linear does not run (2.6), or on a GPU: the saved config
    says false (what ran) and a note says why."""
    from minitune import cpu_linear
    from minitune.train.sections import ModelSection

    monkeypatch.setattr(cpu_linear, "available", lambda: False)
    m = ModelSection(cpu_pack=True)
    notes = m.resolve(torch.device("cpu"))
    assert m.cpu_pack is False and any("cpu_pack true -> false" in n and "not with this torch" in n for n in notes)
    auto = ModelSection()
    auto.resolve(torch.device("cpu"))
    assert auto.cpu_pack is False
