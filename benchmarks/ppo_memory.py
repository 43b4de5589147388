"""Peak memory of a PPO run (policy + reference + value + reward on one base) vs an SFT run on the
same base and sequence shapes. Each recipe runs 2 steps in its own process; peak RSS on CPU,
max_memory_allocated on GPU.

    python benchmarks/ppo_memory.py [--batch 8] [--new 32] [--seq 80]                 # demo model, CPU
    python benchmarks/ppo_memory.py --shape llama2-7b --quant nf4 --dtype bfloat16    # GPU, random weights

`--shape` builds a random-weight checkpoint of one of benchmarks/memory.py's shapes with the demo
model's tokenizer (vocabulary 49,152), so no download is needed on the measuring machine;
`--tokenizer` names a folder with tokenizer.json + tokenizer_config.json (default: the demo model's).
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


def random_checkpoint(shape: str, dtype: str, tokenizer: str) -> Path:
    """A random-weight checkpoint of `shape` that uses the demo model's tokenizer (vocabulary 49,152)."""
    import shutil

    from memory import make_checkpoint

    if not tokenizer:
        from minitune.demo_model import demo_model_path

        tokenizer = str(demo_model_path())
    folder = make_checkpoint(shape, Path(tempfile.gettempdir()) / f"minitune-ppo-bench-{shape}-{dtype}", dtype,
                             vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer) / name, folder / name)
    return folder


def worker(a) -> dict:
    import torch

    from minitune.train.config import parse_cli

    out = Path(tempfile.mkdtemp())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model = [f"model.path={a.path}", f"model.dtype={a.dtype}", f"model.quant={a.quant}",
             f"model.gradient_checkpointing={str(a.gc).lower()}", "run.progress=false", "run.max_steps=2",
             f"run.output_dir={out}"]
    if a.kind == "sft":
        m = _recipe("lora_sft")
        # SFT on the same total shape as a PPO rollout: batch x (prompt + response) tokens
        m.train(parse_cli(m.SFTConfig, model + [f"run.batch_size={a.batch}", f"data.seq_length={a.seq}",
                                                "eval.accuracy=false", "data.synthetic_eval=8", "run.memory_check=false"]))
    else:
        m = _recipe("ppo")
        m.train(parse_cli(m.PPOConfig, model + [f"ppo.rollout_batch={a.batch}", f"ppo.mini_batch={a.batch}",
                                                "ppo.samples_per_prompt=1", "ppo.group_baseline=false",
                                                f"gen.min_new_tokens={a.new}", f"gen.max_new_tokens={a.new}",
                                                "init_adapter=", "sample_every=0", "held_out.prompts=0",
                                                f"reward.adapter={a.reward_adapter}" if a.reward_adapter else
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
    ap.add_argument("--shape", default="", help="random weights of this benchmarks/memory.py shape (default: demo model)")
    ap.add_argument("--tokenizer", default="", help="folder with the tokenizer files for --shape (default: demo model's)")
    ap.add_argument("--path", default="demo", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quant", default="none", choices=["none", "nf4", "fp4", "int8"])
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing in both runs")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", default="sft", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return
    if a.shape:
        a.path = str(random_checkpoint(a.shape, a.dtype, a.tokenizer))
    base = a.quant if a.quant != "none" else a.dtype
    rows = []
    for kind in ("sft", "ppo"):
        r = run_worker(Path(__file__), [f"--kind={kind}", f"--batch={a.batch}", f"--new={a.new}", f"--seq={a.seq}",
                                        f"--reward-adapter={a.reward_adapter}", f"--path={a.path}", f"--dtype={a.dtype}",
                                        f"--quant={a.quant}"] + (["--gc"] if a.gc else []))
        rows.append({"run": kind, "model": a.shape or "smollm2-135m (demo)", "base": base,
                     "batch": a.batch, "peak GiB": r.get("peak_alloc", r["peak_rss"]) / 2**30,
                     "measure": "max_memory_allocated" if "peak_alloc" in r else "peak RSS"})
    rows.append({"run": "ppo / sft", "peak GiB": rows[1]["peak GiB"] / rows[0]["peak GiB"]})
    device = "gpu" if rows[0]["measure"] == "max_memory_allocated" else "cpu"
    save(f"ppo_memory_{a.shape or 'smollm2'}_{base}_{device}", rows,
         ["run", "model", "base", "batch", "peak GiB", "measure"],
         "python benchmarks/ppo_memory.py " + " ".join(sys.argv[1:] if argv is None else argv), a.out)
    return rows


if __name__ == "__main__":
    main()
