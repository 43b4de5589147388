"""Peak memory while loading a quantized model vs the loaded model's size: layers are quantized as
they are read, so the full-precision model never exists in memory.

    python benchmarks/load_memory.py [--quant nf4|fp4|int8|none]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import current_rss_bytes, peak_rss_bytes, run_worker, save  # noqa: E402


def worker(a):
    import torch

    import minitune  # noqa: F401 (import cost is part of the baseline, not of the load)
    from minitune import load_model
    from minitune.model import param_bytes
    from minitune.quant import QuantConfig

    import bitsandbytes  # noqa: F401

    base = current_rss_bytes()
    quant = None if a.quant == "none" else QuantConfig(quant_type=a.quant, compute_dtype="float32")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model = load_model(a.path, quant=quant, device="cuda" if torch.cuda.is_available() else "cpu")
    out = {"model_bytes": param_bytes(model) + sum(getattr(m, "quant_state", None) is not None and
                                                     m.quant_state.absmax.numel() * m.quant_state.absmax.element_size() or 0
                                                     for m in model.modules()),
           "base_rss": base, "peak_rss": peak_rss_bytes(), "final_rss": current_rss_bytes()}
    if torch.cuda.is_available():
        out["peak_alloc"] = torch.cuda.max_memory_allocated()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "int8", "none"])
    ap.add_argument("--path", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return
    if a.path is None:
        from minitune.demo_model import demo_model_path

        a.path = str(demo_model_path())
    rows = []
    for q in ([a.quant] if a.quant == "none" else [a.quant, "none"]):
        r = run_worker(Path(__file__), [f"--quant={q}", f"--path={a.path}"])
        load_peak = r.get("peak_alloc", r["peak_rss"] - r["base_rss"])
        rows.append({"quant": q, "model MiB": r["model_bytes"] / 2**20, "load peak MiB": load_peak / 2**20,
                     "peak / model": load_peak / r["model_bytes"]})
    save(f"load_memory_{a.quant}", rows, ["quant", "model MiB", "load peak MiB", "peak / model"],
         "python benchmarks/load_memory.py " + " ".join(sys.argv[1:] if argv is None else argv), a.out)
    return rows


if __name__ == "__main__":
    main()
