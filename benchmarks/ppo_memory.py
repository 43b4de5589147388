"""Peak memory of a PPO run (policy + reference + value + reward on one base) vs an SFT run on the
same base and sequence shapes. Each recipe runs 2 steps in its own process; peak RSS on CPU,
max_memory_allocated on GPU.

    python benchmarks/ppo_memory.py [--batch 8] [--prompt-len ~40 (synthetic)] [--new 32]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_bytes, run_worker, save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _recipe(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def worker(a) -> dict:
    import torch

    from minitune.train.config import parse_cli

    out = Path(tempfile.mkdtemp())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if a.kind == "sft":
        m = _recipe("lora_sft")
        # SFT on the same total shape as a PPO rollout: batch x (prompt + response) tokens
        m.train(parse_cli(m.SFTConfig, [f"run.output_dir={out}", "run.max_steps=2", f"run.batch_size={a.batch}",
                                        f"data.seq_length={a.seq}", "eval.accuracy=false", "run.progress=false",
                                        "data.synthetic_eval=8", "run.memory_check=false"]))
    else:
        m = _recipe("ppo")
        m.train(parse_cli(m.PPOConfig, [f"run.output_dir={out}", "run.max_steps=2", f"ppo.rollout_batch={a.batch}",
                                        f"ppo.mini_batch={a.batch}", f"gen.min_new_tokens={a.new}",
                                        f"gen.max_new_tokens={a.new}", "init_adapter=", "run.progress=false",
                                        "sample_every=0", f"reward.adapter={a.reward_adapter}" if a.reward_adapter else
                                        "reward.adapter="]))
    r = {"peak_rss": peak_rss_bytes()}
    if torch.cuda.is_available():
        r["peak_alloc"] = torch.cuda.max_memory_allocated()
    return r


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--seq", type=int, default=80, help="SFT sequence length (~ prompt + response of PPO)")
    ap.add_argument("--reward-adapter", default="", help="a reward adapter folder (else the synthetic reward function)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", default="sft", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return
    rows = []
    for kind in ("sft", "ppo"):
        r = run_worker(Path(__file__), [f"--kind={kind}", f"--batch={a.batch}", f"--new={a.new}", f"--seq={a.seq}",
                                        f"--reward-adapter={a.reward_adapter}"])
        rows.append({"run": kind, "batch": a.batch, "peak GiB": r.get("peak_alloc", r["peak_rss"]) / 2**30})
    rows.append({"run": "ppo / sft", "peak GiB": rows[1]["peak GiB"] / rows[0]["peak GiB"]})
    save("ppo_memory_cpu", rows, ["run", "batch", "peak GiB"],
         "python benchmarks/ppo_memory.py " + " ".join(sys.argv[1:] if argv is None else argv), a.out)
    return rows


if __name__ == "__main__":
    main()
