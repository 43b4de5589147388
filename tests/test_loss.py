"""The fused (chunked) linear + cross-entropy equals the plain loss, in value and in gradient."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minitune.train.loss import FusedLinearCrossEntropy, cross_entropy_sum


def reference(hidden, labels, weight):
    """Full fp64 logits and cross-entropy over the labelled positions: what the loss must equal."""
    keep = labels != -100
    logits = hidden[keep].double() @ weight.double().t()
    return F.cross_entropy(logits, labels[keep], reduction="sum")


@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_fused_loss_and_gradients_equal_the_full_logits_in_float64(chunk, train_head):
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(16, 50, bias=False).double()
    head.weight.requires_grad_(train_head)
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[0, :3] = -100  # a masked prompt
    labels[2, -1] = -100
    wrt = [hidden] + ([head.weight] if train_head else [])
    ref = reference(hidden, labels, head.weight)
    ref_grads = torch.autograd.grad(ref * 1.7, wrt)
    out = cross_entropy_sum(hidden, labels, head, chunk)
    grads = torch.autograd.grad(out * 1.7, wrt)  # a non-unit upstream gradient is applied in backward
    assert abs(out.item() - ref.item()) < 1e-10
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max().item() < 1e-12
    assert grads[0][0, :3].abs().max() == 0  # masked positions get no gradient


def test_fused_function_passes_gradcheck():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 9, (6,), generator=g)
    assert torch.autograd.gradcheck(lambda h, w: FusedLinearCrossEntropy.apply(h, w, y, 4), (h, w))


def test_fused_float32_matches_plain_float32_and_lora_heads_fall_back():
    g = torch.Generator().manual_seed(2)
    head = nn.Linear(32, 300, bias=False)
    head.weight.requires_grad_(False)
    hidden = torch.randn(2, 40, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, 300, (2, 40), generator=g)
    plain = cross_entropy_sum(hidden, labels, head, 0)
    (gp,) = torch.autograd.grad(plain, hidden)
    fused = cross_entropy_sum(hidden, labels, head, 16)
    (gf,) = torch.autograd.grad(fused, hidden)
    assert abs(plain.item() - fused.item()) / plain.item() < 1e-6
    assert (gp - gf).abs().max() < 1e-6
    biased = nn.Linear(32, 300, bias=True)  # not what the fused path computes: the plain path runs
    out = cross_entropy_sum(hidden, labels, biased, 16)
    logits = biased(hidden.flatten(0, 1))
    assert torch.allclose(out, F.cross_entropy(logits, labels.flatten(), reduction="sum"), rtol=1e-6)


def test_no_labelled_token_gives_zero_loss_and_zero_gradient():
    head = nn.Linear(8, 20, bias=False)
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    labels = torch.full((1, 4), -100)
    for chunk in (0, 2):
        out = cross_entropy_sum(hidden, labels, head, chunk)
        (g,) = torch.autograd.grad(out, hidden)
        assert out.item() == 0.0 and g.abs().max() == 0


def test_fused_loss_is_stable_for_large_logits_and_runs_in_bfloat16():
    g = torch.Generator().manual_seed(3)
    head = nn.Linear(32, 300, bias=False).requires_grad_(False)
    hidden = (torch.randn(2, 40, 32, generator=g) * 40).requires_grad_()  # logits in the hundreds
    labels = torch.randint(0, 300, (2, 40), generator=g)
    ref = reference(hidden, labels, head.weight)
    (gr,) = torch.autograd.grad(ref, hidden)
    fused = cross_entropy_sum(hidden, labels, head, 16)
    (gf,) = torch.autograd.grad(fused, hidden)
    assert torch.isfinite(fused) and abs(fused.item() - ref.item()) / ref.item() < 1e-5
    assert (gf.double() - gr).abs().max() < 1e-4
    # bf16 hidden and head: the logits are upcast into the fp32 buffer, the gradient comes back in bf16
    hb, wb = hidden.detach().bfloat16().requires_grad_(), head.to(torch.bfloat16)
    fb = cross_entropy_sum(hb / 40, labels, wb, 16)
    (gb,) = torch.autograd.grad(fb, hb)
    rb = reference(hb.detach() / 40, labels, wb.weight)
    assert fb.dtype == torch.float32 and gb.dtype == torch.bfloat16
    assert abs(fb.item() - rb.item()) / rb.item() < 1e-5
