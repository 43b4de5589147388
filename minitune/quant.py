"""Quantization as a transform on a built model: `quantize(model, QuantConfig)`.

4-bit (NF4/FP4) layers are minitune's own `Linear4bit`: the packed weight is a plain, frozen
`nn.Parameter` stored in `quant_storage` dtype and the bitsandbytes `QuantState` lives on the
module. bitsandbytes' `nn.Linear4bit` keeps the state on a `Params4bit` parameter subclass, which
FSDP2 loses when it turns parameters into DTensors ("quant_state is required"); a plain parameter
in a float storage dtype shards like any other. 8-bit layers are bitsandbytes' `Linear8bitLt`.

Applied to a model on the `meta` device (as `load_model(..., quant=...)` does), layers are
quantized one by one as the checkpoint is read, so peak memory stays near the quantized size.

bitsandbytes is needed only to quantize: without it this module still imports (plain LoRA on a
float base does not touch it) and `quantize` says what to install.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from minitune.cpu_linear import is_plain_linear
from minitune.dtypes import as_dtype
from minitune.errors import MinituneError

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
except ImportError:  # plain (unquantized) LoRA runs without it
    bnb = bnbF = None


class QuantType(str, Enum):
    NF4 = "nf4"
    FP4 = "fp4"
    INT8 = "int8"


def require_bitsandbytes(what: str) -> None:
    if bnb is None:
        raise MinituneError(f"{what} needs bitsandbytes, which is not installed: pip install bitsandbytes "
                            "(or train without quantization: model.quant=none)")


@dataclass
class QuantConfig:
    """quant_type: nf4 | fp4 | int8. double_quant: quantize the 4-bit absmax constants too.
    compute_dtype: dtype of the 4-bit matmul. quant_storage: dtype the packed 4-bit bytes are stored
    in (set it to FSDP's param dtype, e.g. bfloat16, to shard). skip: module names never quantized.
    """

    SHORTHAND = "quant_type"  # in a config, `quant: nf4` is QuantConfig(quant_type="nf4")

    quant_type: QuantType = QuantType.NF4
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    quant_storage: str = "uint8"
    blocksize: int = 64
    int8_threshold: float = 6.0
    skip: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        self.quant_type = QuantType(self.quant_type)
        as_dtype(self.compute_dtype), as_dtype(self.quant_storage)
        self.skip = tuple(self.skip)
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise MinituneError(f"quant.blocksize must be a power of two from 32 to 4096 (bitsandbytes' block sizes), "
                                f"got {self.blocksize}")

    @property
    def is_4bit(self) -> bool:
        return self.quant_type in (QuantType.NF4, QuantType.FP4)


class Linear4bit(nn.Module):
    """A frozen 4-bit linear: y = x @ dequant(W).T + b, computed in `compute_dtype`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, cfg: QuantConfig, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_type = cfg.quant_type.value
        self.double_quant, self.blocksize = cfg.double_quant, cfg.blocksize
        self.compute_dtype, self.quant_storage = as_dtype(cfg.compute_dtype), as_dtype(cfg.quant_storage)
        n_bytes = (in_features * out_features + 1) // 2
        itemsize = torch.empty(0, dtype=self.quant_storage).element_size()
        packed = torch.empty((n_bytes // itemsize, 1), dtype=self.quant_storage, device=device or "meta")
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device or "meta"), requires_grad=False) if bias else None
        self.quant_state: bnbF.QuantState | None = None

    @torch.no_grad()
    def load_weight_(self, attr: str, tensor: torch.Tensor, device) -> None:
        """Quantizes a full-precision weight [out, in] (or sets the bias) on `device`."""
        if attr == "bias":
            self.bias = nn.Parameter(tensor.to(device=device, dtype=self.compute_dtype), requires_grad=False)
            return
        if tuple(tensor.shape) != (self.out_features, self.in_features):
            raise MinituneError(
                f"weight of shape {tuple(tensor.shape)} does not fit a {self.out_features}x{self.in_features} linear"
            )
        w = tensor.to(device)
        if not w.is_floating_point():
            w = w.float()
        packed, self.quant_state = bnbF.quantize_4bit(
            w.contiguous(), blocksize=self.blocksize, compress_statistics=self.double_quant,
            quant_type=self.quant_type, quant_storage=self.quant_storage,
        )
        self.weight = nn.Parameter(packed, requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        """The full-precision weight [out, in] (fp32) the matmul actually uses."""
        self._sync_state()
        return bnbF.dequantize_4bit(self.weight.data, self.quant_state).float()

    def _sync_state(self):
        if self.quant_state.absmax.device != self.weight.device:
            self.quant_state.to(self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._sync_state()
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return bnb.matmul_4bit(x.to(self.compute_dtype), self.weight.t(), quant_state=self.quant_state, bias=bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.quant_type}, dq={self.double_quant}, storage={self.quant_storage}"


class _Linear8bitLoader:
    """Mixin that lets `load_model` fill a bitsandbytes Linear8bitLt tensor by tensor."""

    @torch.no_grad()
    def load_weight_(self, attr: str, tensor: torch.Tensor, device) -> None:
        if attr == "bias":
            self.bias = nn.Parameter(tensor.to(device=device, dtype=torch.float32), requires_grad=False)
            return
        w = tensor.float() if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32) else tensor
        self.weight = bnb.nn.Int8Params(w.to("cpu").contiguous(), requires_grad=False, has_fp16_weights=False)
        self.weight = self.weight.to(device)  # bitsandbytes quantizes on the move to a device
        if self.bias is not None and self.bias.device.type == "meta":
            self.bias = nn.Parameter(torch.zeros(self.out_features, device=device), requires_grad=False)


if bnb is not None:
    class Linear8bit(_Linear8bitLoader, bnb.nn.Linear8bitLt):
        """bitsandbytes' LLM.int8() linear with a streaming loader."""

        def dequantize(self) -> torch.Tensor:
            return _dequantize_int8(self)

    _QUANTIZED = (Linear4bit, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
else:
    Linear8bit = None
    _QUANTIZED = (Linear4bit,)


def _dequantize_int8(linear) -> torch.Tensor:
    # bitsandbytes moves the row scales from the parameter to `state` after the first forward.
    scb = linear.weight.SCB if getattr(linear.weight, "SCB", None) is not None else linear.state.SCB
    return linear.weight.data.float() * scb.float()[:, None] / 127.0


def _make_quantized(linear: nn.Linear, cfg: QuantConfig) -> nn.Module:
    require_bitsandbytes(f"quantizing to {cfg.quant_type.value}")
    has_bias = linear.bias is not None
    on_meta = linear.weight.device.type == "meta"
    device = linear.weight.device
    if cfg.quant_type == QuantType.INT8:
        with torch.device("meta"):
            new = Linear8bit(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                             threshold=cfg.int8_threshold)
    else:
        new = Linear4bit(linear.in_features, linear.out_features, has_bias, cfg)
    if not on_meta:
        new.load_weight_("weight", linear.weight.data, device)
        if has_bias:
            new.load_weight_("bias", linear.bias.data, device)
    return new


def is_quantized_linear(m: nn.Module) -> bool:
    return isinstance(m, _QUANTIZED)


def quantize(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """Replaces every `nn.Linear` (except names in `cfg.skip`) with a quantized linear, in place.

    On a meta model the new layers wait for `load_weight_` (streaming load); on a real model each
    layer is quantized immediately and its full-precision weight released. Returns the model.
    """
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if is_plain_linear(child) and child_name not in cfg.skip and full not in cfg.skip:
                setattr(module, child_name, _make_quantized(child, cfg))
    return model


def dequantize_weight(linear: nn.Module) -> torch.Tensor:
    """The full-precision weight [out, in] of any supported linear (fp32 for quantized ones)."""
    if isinstance(linear, Linear4bit) or (Linear8bit is not None and isinstance(linear, Linear8bit)):
        return linear.dequantize()
    if bnb is not None and isinstance(linear, bnb.nn.Linear4bit):
        return bnbF.dequantize_4bit(linear.weight.data, linear.weight.quant_state).float()
    if bnb is not None and isinstance(linear, bnb.nn.Linear8bitLt):
        return _dequantize_int8(linear)
    if isinstance(linear, nn.Linear):
        return linear.weight.data
    raise MinituneError(f"cannot dequantize a {type(linear).__name__}")


def prepare_for_kbit_training(model: nn.Module, *, norm_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Explicit version of PEFT's `prepare_model_for_kbit_training`: freezes every base parameter and
    keeps the non-quantized ones (norms, embeddings, lm_head) in `norm_dtype`.

    PEFT upcasts all of these to fp32; on a 7B model that costs over a gigabyte (peft #1149), so pass
    norm_dtype=torch.bfloat16 to keep them as loaded. Gradient checkpointing is a separate transform
    (`minitune.lora.apply_activation_checkpointing`).
    """
    for m in model.modules():
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
            if not is_quantized_linear(m) and p.is_floating_point() and p.dtype != norm_dtype:
                p.data = p.data.to(norm_dtype)
    return model
