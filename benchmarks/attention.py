"""Packed-block attention, forward + backward of one attention call per path, against plain causal
attention over the same (unpacked) shape.

    python benchmarks/attention.py                          # CPU: SmolLM2 heads, T = 256 .. 8192
    python benchmarks/attention.py --heads 32 --kv-heads 8 --head-dim 128 --dtype bfloat16   # GPU, flex too

Documents of 64-700 tokens fill each row (as benchmarks/memory.py --packed and SFT data do). Paths:
"sdpa" (dense T x T boolean mask), "segments" (one causal SDPA per document), "flex" (flex_attention
with a document block mask; CUDA only for training). "causal" is the unpacked reference: packed
attention does less work than it (no attention across documents), so a ratio below 1 is possible.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import packed_blocks, save  # noqa: E402


def time_path(q, k, v, mask, repeats: int) -> float:
    import torch

    from minitune.attention import attend

    def once():
        attend(q, k, v, mask).sum().backward()

    once()
    times = []
    for _ in range(repeats):
        if q.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        once()
        if q.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[256, 2048, 8192])
    ap.add_argument("--tokens", type=int, default=8192, help="batch = tokens // seq (at least 1)")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default=None)
    a = ap.parse_args(argv)
    import torch

    from minitune.attention import AttentionImpl, plan

    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, a.dtype)
    paths = [AttentionImpl.SDPA, AttentionImpl.SEGMENTS] + ([AttentionImpl.FLEX] if dev.type == "cuda" else [])
    rows = []
    for seq in a.seqs:
        B = max(1, a.tokens // seq)
        g = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(B, a.heads, seq, a.head_dim, generator=g).to(dev, dtype).requires_grad_()
        k = torch.randn(B, a.kv_heads, seq, a.head_dim, generator=g).to(dev, dtype).requires_grad_()
        v = torch.randn(B, a.kv_heads, seq, a.head_dim, generator=g).to(dev, dtype).requires_grad_()
        pos = packed_blocks(B, seq, 1)[0]["position_ids"].to(dev)
        causal = time_path(q, k, v, None, a.repeats)
        row = {"B x T": f"{B}x{seq}", "causal ms": causal * 1e3}
        for impl in paths:
            mask = plan(seq, seq, position_ids=pos, padding_mask=None, impl=impl, device=dev)
            t = time_path(q, k, v, mask, a.repeats)
            row[f"{impl.value} ms"] = t * 1e3
            row[f"{impl.value} / causal"] = t / causal
        rows.append(row)
        print(row, flush=True)
    cols = ["B x T", "causal ms"] + [c for impl in paths for c in (f"{impl.value} ms", f"{impl.value} / causal")]
    name = a.name or f"attention_packed_{dev.type}"
    save(name, rows, cols, "python benchmarks/attention.py " + " ".join(sys.argv[1:] if argv is None else argv), a.out)
    return rows


if __name__ == "__main__":
    main()
