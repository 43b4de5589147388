"""Dtype names as configs spell them."""
from __future__ import annotations

import torch

from minitune.errors import MinituneError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


def as_dtype(d: str | torch.dtype) -> torch.dtype:
    """"bfloat16" -> torch.bfloat16 (a torch.dtype passes through); an unknown name is a clear error."""
    if isinstance(d, torch.dtype):
        return d
    if d not in _DTYPES:
        raise MinituneError(f"unknown dtype {d!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[d]
