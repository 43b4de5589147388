"""Packing throughput: tokens/s of ConstantLengthDataset over SmolLM2-tokenized hh-rlhf text on CPU
(tokenization in batches included).

    python benchmarks/packing.py [--seq 1024] [--repeat 4] [--batch 512]
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=4, help="passes over the 2,312 rows (x2 texts each)")
    ap.add_argument("--batch", type=int, default=512, help="rows tokenized per batch")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from minitune.data import ConstantLengthDataset, make_formatter
    from minitune.demo_model import demo_model_path
    from minitune.tokenizer import load_tokenizer

    tok = load_tokenizer(demo_model_path())
    with gzip.open(a.data, "rt") as f:
        rows = [{"text": r[k]} for r in map(json.loads, f) for k in ("chosen", "rejected")] * a.repeat
    ds = ConstantLengthDataset(rows, make_formatter("text", tok), seq_length=a.seq, tokenize_batch=a.batch, shard=(0, 1))
    t0 = time.perf_counter()
    blocks = sum(1 for _ in ds)
    dt = time.perf_counter() - t0
    rows_out = [{"rows": len(rows), "tokens": ds.stats.tokens, "blocks": blocks, "seconds": dt,
                 "tokens/s": ds.stats.tokens / dt}]
    save("packing_smollm2_cpu", rows_out, ["rows", "tokens", "blocks", "seconds", "tokens/s"],
         "python benchmarks/packing.py " + " ".join(sys.argv[1:] if argv is None else argv), a.out)
    return rows_out


if __name__ == "__main__":
    main()
