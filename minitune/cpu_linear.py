"""Linear layers on CPU through oneDNN with prepacked weights, for passes run without autograd.

Generation on CPU multiplies a few rows (one per sequence) by every weight of the model, so a decode
step is a stream of skinny matrix products. torch's CPU build hands `F.linear` to MKL's sgemm, which
on the AMD EPYC this project is measured on reads the weights at ~10 GB/s for 8 rows, a third of what
the memory delivers (summing the same weights runs at ~29 GB/s). oneDNN with the weight reordered
once into its blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, the packing inductor's
freezing pass uses) runs the same products 2-2.5x faster at 1-32 rows and 1.4-2x at 64-256 rows
(SmolLM2's 30 layers: 21 ms instead of 52 ms per step at 8 rows; the 49k-vocabulary head 4 ms
instead of 19 ms).

`pack_linears(model)` is a transform applied to a built model: each plain `nn.Linear` (also the base
layer inside a LoRA wrapper, not bitsandbytes layers) on CPU in float32 or bfloat16 keeps a packed copy
of its weight, and its forward uses the copy under `torch.no_grad()` / `inference_mode()`
(generation, reference and reward scoring, evaluation).
Anything else (a pass with autograd on, another device or dtype) runs `F.linear` as before, so
training is bitwise what it was without packing. Costs one more copy of those weights in memory (the
oneDNN tensors are not parameters: they are not saved, moved or counted). A weight changed in place
(an optimizer step, `merge`, `load_state_dict`) or replaced is repacked at its next eager forward; inside
a compiled region, where that check cannot run, the op compares the weight's version and storage with
the copy's and multiplies the weight itself when they differ: never a stale result. Results equal `F.linear`'s up to the
summation order (fp32: ~1e-6 relative).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

PACK_DTYPES = (torch.float32, torch.bfloat16)
ROWS_HINT = 64  # oneDNN picks the packed layout for this many rows; measured: 1-2048 rows run alike


@torch.library.custom_op("minitune::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], packed: torch.Tensor,
                  version: int, ptr: int) -> torch.Tensor:
    """x @ weight.T + bias through `packed`, oneDNN's copy of weight made at `weight._version == version`
    from storage `ptr`; a weight changed since (or another one) is multiplied directly, never stale.
    An opaque call inside `torch.compile` (inductor lowers the mkldnn op only for weights it froze)."""
    if weight.is_inference() or weight._version != version or weight.data_ptr() != ptr:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _(x, weight, bias, packed, version, ptr):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@functools.cache
def available() -> bool:
    """True when this torch build has oneDNN (mkldnn) and its packed linear works here (not in torch 2.6, whose
    custom-op wrapper reads the storage of every tensor argument, which oneDNN's opaque tensors do not have)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 10
        x = torch.ones(2, 4)
        y = packed_linear(x, w, None, torch.ops.mkldnn._reorder_linear_weight(w, 2), w._version, w.data_ptr())
        return bool(torch.allclose(y, F.linear(x, w), atol=1e-5))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


INTEL_MIN_PACKED = 1 << 24  # on Intel CPUs only weights at least this large (an output projection) are packed


def cpu_info(field: str) -> str:
    """A field of the first CPU in Linux's /proc/cpuinfo ("vendor_id", "model name"); "" where it is absent."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.cache
def cpu_vendor() -> str:
    """The CPU vendor Linux reports ("GenuineIntel", "AuthenticAMD"), "" where it does not say."""
    return cpu_info("vendor_id")


def packing_pays(out_features: int, in_features: int) -> bool:
    """Whether oneDNN's packed copy of a weight of this shape multiplies faster than `F.linear` (MKL)
    on this CPU, by a rule rather than a timing, so the choice (and the last bits of every no-grad
    product) is the same in every run on a machine. Measured on SmolLM2's shapes at 8 and 64 rows:
    on an AMD EPYC every shape pays (2-2.5x at 8 rows, 1.4-2x at 64: MKL's skinny products run far
    below the memory's speed there); on an Intel Xeon MKL runs the layers' products as fast or faster
    (0.5-1.1x packed, varying from run to run) and only the 49152x576 output projection gains
    (2-2.7x at 8 rows, 1.3x at 64). So: every shape off Intel, weights of at least
    INTEL_MIN_PACKED elements (64 MB in fp32) on it, whatever the dtype; the line between is untested on larger models
    (a 7B model's layers hold 16-45M elements)."""
    if cpu_vendor() == "GenuineIntel":
        return out_features * in_features >= INTEL_MIN_PACKED
    return True


class _Pack:
    """A layer's packed copy and what it was made from. Copies and pickles of the model carry an
    empty one (oneDNN tensors have no storage to copy): they repack at their first forward."""

    __slots__ = ("src", "version", "ptr", "packed")

    def __init__(self, src=None, version=-1, ptr=0, packed=None):
        self.src, self.version, self.ptr, self.packed = src, version, ptr, packed

    def __deepcopy__(self, memo):
        return _Pack()

    def __reduce__(self):
        return (_Pack, ())


def _packable_weight(w: torch.Tensor) -> bool:
    # inference tensors keep no version counter to detect changes by
    return w.device.type == "cpu" and w.dtype in PACK_DTYPES and not w.is_inference()


def _packable(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return type(m) in PLAIN_LINEARS and w is not None and _packable_weight(w)


class PackedLinear(nn.Linear):
    """An `nn.Linear` that keeps a oneDNN-packed copy of its weight for passes run without autograd.
    Made from a built layer by `pack_linears` (which swaps the class, as FSDP2's
    `fully_shard` does; parameters, names and state dict unchanged); `unpack_linears` swaps it back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != w.dtype:
            return F.linear(x, w, b)
        if not torch.compiler.is_compiling():  # (dynamo cannot trace is_inference(): the op checks it there)
            if not _packable_weight(w):
                return F.linear(x, w, b)
            self.refresh()  # in a compiled region the op itself falls back to F.linear if the copy is stale
        p = self.__dict__.get("_pack")
        if p is None or p.packed is None:  # a copy first called inside a compiled region
            return F.linear(x, w, b)
        return packed_linear(x, w, b, p.packed, p.version, p.ptr)

    def refresh(self) -> None:
        """Repacks if the weight changed in place or was replaced since the copy was made."""
        w, p = self.weight, self.__dict__.get("_pack") or _Pack()
        if p.src is not w or p.version != w._version:  # holding src keeps its storage from being reused
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), ROWS_HINT)
            self._pack = _Pack(w, w._version, w.data_ptr(), packed)


PLAIN_LINEARS = (nn.Linear, PackedLinear)  # exactly these: bitsandbytes' layers subclass nn.Linear


def is_plain_linear(m: nn.Module) -> bool:
    """An unquantized linear layer (packed or not), not a subclass such as bitsandbytes' Linear4bit."""
    return type(m) in PLAIN_LINEARS


def pack_linears(model: nn.Module, only_faster: bool = False) -> int:
    """Gives every plain CPU float32/bfloat16 `nn.Linear` in `model` a oneDNN-packed weight copy
    used in passes without autograd (see the module docstring); with `only_faster`, only the layers
    whose weight shape multiplies faster packed on this CPU (`packing_pays`), as the recipes do.
    Apply it last, after LoRA and quantization. Returns how many layers hold one: 0 where oneDNN is
    unavailable. Idempotent."""
    if not available():
        return 0
    n = 0
    for m in model.modules():
        if _packable(m) and (type(m) is PackedLinear or not only_faster
                             or packing_pays(m.out_features, m.in_features)):
            m.__class__ = PackedLinear
            m.refresh()
            n += 1
    return n


def unpack_linears(model: nn.Module) -> int:
    """Removes the packed copies `pack_linears` added; returns how many layers had one."""
    n = 0
    for m in model.modules():
        if type(m) is PackedLinear:
            m.__dict__.pop("_pack", None)
            m.__class__ = nn.Linear
            n += 1
    return n


def packed_bytes(model: nn.Module) -> int:
    """Bytes the packed copies hold (the memory `pack_linears` adds)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if type(m) is PackedLinear)
