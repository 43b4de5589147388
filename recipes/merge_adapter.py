"""Merge a LoRA adapter into its base and write a full-precision Hugging Face folder.

    python recipes/merge_adapter.py --base demo --adapter outputs/lora_sft/adapter --out outputs/merged
    python recipes/merge_adapter.py --base meta-llama/Llama-2-7b-hf --adapter A --out M --quant nf4 --dtype bfloat16

With --quant (the base the adapter was trained on was 4-bit or 8-bit), the merge goes into the
*dequantized* base weights: W = dequant(W_q) + scale * B @ A. That reproduces the trained model up to
float rounding; the result differs from the original full-precision base by the quantization error,
which the adapter was trained to work with. Requantizing the merged weights would add a second
quantization error (peft #2321), so the export stays in full precision.
"""
from __future__ import annotations

import argparse
import sys

import torch

from minitune.adapters import load_adapter
from minitune.checkpoint import load_model, save_model
from minitune.errors import MinituneError
from minitune.dtypes import as_dtype
from minitune.lora import merge_for_export
from minitune.quant import QuantConfig, QuantType
from minitune.tokenizer import load_tokenizer
from minitune.train.setup import model_path


def merge(base: str, adapter: str, out: str, *, quant: str = "none", dtype: str = "float32") -> None:
    path = model_path(base)
    model = load_model(path, dtype=torch.float32,
                       quant=None if quant == "none" else QuantConfig(quant_type=quant, compute_dtype="float32"))
    load_adapter(model, adapter, "default")
    merge_for_export(model, "default", dtype=as_dtype(dtype))
    save_model(model, out, tokenizer=load_tokenizer(path))
    print(f"merged {adapter} into {base} -> {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="merge a LoRA adapter into its base model")
    ap.add_argument("--base", required=True, help='HF folder, .gguf file, hub id, or "demo"')
    ap.add_argument("--adapter", required=True, help="PEFT-format adapter folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quant", default="none", choices=["none"] + [q.value for q in QuantType],
                    help="the quantization the adapter was trained over (merged into the dequantized weights)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    try:
        merge(args.base, args.adapter, args.out, quant=args.quant, dtype=args.dtype)
    except MinituneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
