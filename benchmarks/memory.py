"""Peak memory and training throughput of one LoRA/QLoRA/full fine-tuning step, minitune vs
transformers+peft (`--compare-hf`), with minitune's own memory prediction beside the measurement.

    python benchmarks/memory.py --model smollm2-135m --mode lora --seq 256 --batch 4 --compare-hf
    python benchmarks/memory.py --model llama2-7b --mode qlora --seq 2048 --batch 1 --gc --compare-hf   # GPU
    python benchmarks/memory.py --model llama2-7b --mode qlora --seq 2048 --batch 1 --gc --packed --compare-hf
    python benchmarks/memory.py --model llama3-8b --mode qlora --gc --offload --seq-sweep --budget-gib 24   # GPU

--packed feeds what SFT trains on: blocks from ConstantLengthDataset over documents of 64-700 tokens
(positions restart at each document, the token after a document's end is not a target), through
minitune's packed attention (`--attention`) and transformers' own packed-sequence mask. Otherwise
random tokens, every position a target. --compile compiles minitune's decoder layers (the first,
untimed step includes the compilation; its time is reported). --seq-sweep runs one configuration
at growing sequence lengths (doubling from --seq, then bisecting to --sweep-step) and reports the
longest one whose peak stays under --budget-gib, as a table and a PNG (with matplotlib).

Each configuration runs in a fresh process, so peak RSS (CPU) and max_memory_allocated (GPU) belong
to that run alone; with --rounds N each library runs N times, alternating (a shared machine's speed
drifts by 10-20% from minute to minute; alternating exposes both libraries to the same drift). Random weights (memory and speed do not depend on values); the same checkpoint
folder feeds both libraries. Tokens/s: median of the timed steps after warm-up.

FLOP accounting for MFU (per trained token, N = parameters in the linear layers, L layers, T seq,
D width): forward 2N + attention 2*L*T*D (causal QK^T and AV); backward: input gradients 2N +
attention 4*L*T*D, plus weight gradients 2N only for full fine-tuning (LoRA's own are negligible).
LoRA step ~ 4N + 6LTD; full ~ 6N + 6LTD; gradient checkpointing recomputes the forward: + 2N + 2LTD.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import current_rss_bytes, packed_blocks, peak_rss_bytes, run_worker, save  # noqa: E402

SHAPES = {  # Hugging Face config values
    "tiny": dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "llama2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40),
    "llama2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8),
}
MODES = ("full", "lora", "lora8bit", "qlora", "qlora-nodq")
PEAK_FLOPS = {"cuda": 989e12}  # H100 SXM dense bf16


def make_checkpoint(model: str, folder: Path, dtype: str, **overrides) -> Path:
    """A random-weight HF folder for `model` (config values in `overrides` replace the shape's)."""
    import torch

    from minitune.checkpoint import save_model
    from minitune.model import ModelConfig, build_model

    if (folder / "config.json").exists():
        return folder
    cfg = ModelConfig.from_hf({"model_type": "llama", "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                               "bos_token_id": 1, "eos_token_id": 2, **SHAPES[model], **overrides})
    m = build_model(cfg, dtype=getattr(torch, dtype), seed=0)
    save_model(m, folder, max_shard_bytes=2 * 2**30)
    return folder


def make_batches(a, n: int) -> list[dict]:
    """n batches of {input_ids, position_ids, labels} [B, T] (labels aligned: the target of each position)."""
    import torch

    g = torch.Generator().manual_seed(0)
    if not a.packed:
        out = []
        for _ in range(n):
            ids = torch.randint(0, 32000, (a.batch, a.seq + 1), generator=g)
            out.append({"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
                        "position_ids": torch.arange(a.seq).repeat(a.batch, 1)})
        return out
    return packed_blocks(a.batch, a.seq, n)


def worker(a) -> dict:
    import torch

    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    base_rss = current_rss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] if a.targets == "all-linear" \
        else a.targets.split(",")
    if a.lib == "minitune":
        from minitune import load_model
        from minitune.activations import apply_activation_checkpointing
        from minitune.attention import set_attention
        from minitune.compile import compile_layers
        from minitune.lora import LoRAConfig, apply_lora
        from minitune.quant import QuantConfig, prepare_for_kbit_training
        from minitune.train.loss import cross_entropy_sum

        quant = {"lora8bit": QuantConfig(quant_type="int8"), "qlora": QuantConfig(compute_dtype=a.dtype),
                 "qlora-nodq": QuantConfig(compute_dtype=a.dtype, double_quant=False)}.get(a.mode)
        model = load_model(a.path, dtype=dtype, device=dev, quant=quant)
        if quant is not None:
            prepare_for_kbit_training(model, norm_dtype=dtype)
        if a.mode != "full":
            apply_lora(model, LoRAConfig(r=a.rank, alpha=2 * a.rank, target_modules=tuple(targets)))
        else:
            model.requires_grad_(True)
        set_attention(model, a.attention)
        if a.compile:
            compile_layers(model)
        if a.gc:
            apply_activation_checkpointing(model, offload=a.offload)

        def step_loss(b):
            out = model(b["input_ids"], b["position_ids"], return_logits=False)
            return cross_entropy_sum(out.hidden, b["labels"], model.lm_head, a.ce_chunk) / (b["labels"] != -100).sum()
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        kw = {}
        if a.mode in ("qlora", "qlora-nodq", "lora8bit"):
            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_8bit=a.mode == "lora8bit", load_in_4bit=a.mode != "lora8bit", bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=a.mode == "qlora", bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(a.path, dtype=dtype, device_map={"": dev}, attn_implementation="sdpa", **kw)
        if kw:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=a.gc)
        elif a.gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        if a.mode != "full":
            model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=targets, task_type="CAUSAL_LM"))

        def step_loss(b):  # transformers' own loss; shift_labels: the targets are already aligned
            return model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"],
                         shift_labels=b["labels"]).loss
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if a.optim == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-5)
    else:
        import bitsandbytes as bnb

        opt = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[a.optim](params, lr=1e-5)
    load_rss = current_rss_bytes()
    batches = make_batches(a, a.warmup + a.steps)
    times = []
    for i in range(a.warmup + a.steps):
        b = {k: v.to(dev) for k, v in batches[i].items()}
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step_loss(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i == 0:
            first = time.perf_counter() - t0
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    tok_s = a.batch * a.seq / statistics.median(times)
    out = {"tokens_per_s": tok_s, "first_step_s": first, "step_s": statistics.median(times), "peak_rss_gib": peak_rss_bytes() / 2**30, "base_rss_gib": base_rss / 2**30,
           "after_load_rss_gib": load_rss / 2**30, "loss": float(loss)}
    if dev.type == "cuda":
        out["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


def predict(a) -> float:
    import torch

    from minitune.memory import MemoryPlan, estimate
    from minitune.model import ModelConfig

    cfg = ModelConfig.from_hf({"model_type": "llama", **SHAPES[a.model]})
    from minitune.lora import LoRAConfig
    from minitune.quant import QuantConfig

    quant = {"lora8bit": QuantConfig(quant_type="int8"), "qlora": QuantConfig(),
             "qlora-nodq": QuantConfig(double_quant=False)}.get(a.mode)
    lora = None if a.mode == "full" else LoRAConfig(r=a.rank, alpha=2 * a.rank, target_modules=tuple(a.targets.split(",")))
    plan = MemoryPlan(batch=a.batch, seq=a.seq, quant=quant, lora=lora, dtype=getattr(torch, a.dtype),
                      optimizer_state_bytes=2 if "8bit" in a.optim else 8, gradient_checkpointing=a.gc,
                      ce_chunk=a.ce_chunk, device=a.device.split(":")[0], compiled=a.compile, offload=a.offload)
    return estimate(cfg, plan)["peak"] / 2**30


def mfu(a, tok_s: float) -> float | None:
    peak = PEAK_FLOPS.get(a.device.split(":")[0])
    if peak is None:
        return None
    s = SHAPES[a.model]
    D, I, L = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    kv = D // s["num_attention_heads"] * s["num_key_value_heads"]
    N = L * (2 * D * D + 2 * D * kv + 3 * D * I) + D * s["vocab_size"]
    attn = 2 * L * a.seq * D
    flops = (6 * N if a.mode == "full" else 4 * N) + 3 * attn + ((2 * N + attn) if a.gc else 0)
    return flops * tok_s / peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", choices=list(SHAPES))
    ap.add_argument("--mode", default="lora", choices=MODES)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--optim", default="adamw", choices=["adamw", "adamw8bit", "paged_adamw8bit"])
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--device", default=None)
    ap.add_argument("--ce-chunk", type=int, default=256, help="fused lm_head + loss over this many tokens (0: plain)")
    ap.add_argument("--attention", default="auto", choices=["auto", "sdpa", "segments", "flex"])
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (minitune)")
    ap.add_argument("--offload", action="store_true", help="with --gc: kept layer inputs in CPU memory (minitune)")
    ap.add_argument("--packed", action="store_true", help="ConstantLengthDataset blocks of 64-700 token documents")
    ap.add_argument("--seq-sweep", action="store_true", help="longest --seq whose peak fits --budget-gib")
    ap.add_argument("--budget-gib", type=float, default=24.0)
    ap.add_argument("--sweep-step", type=int, default=1024, help="bisection granularity of the sweep (tokens)")
    ap.add_argument("--sweep-max", type=int, default=262144)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--compare-hf", action="store_true")
    ap.add_argument("--live-peak", action="store_true",
                    help="CPU: one more minitune run with MALLOC_MMAP_THRESHOLD_=131072 (freed tensors go back to the "
                         "OS, so peak RSS is the live tensors' peak, what the predictor models)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs per library, alternating; tokens/s is their median, peak their maximum")
    ap.add_argument("--path", default=None, help="checkpoint folder (default: the demo model for smollm2-135m, else random)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--name", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lib", default="minitune", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    import torch

    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    if a.worker:
        print(json.dumps(worker(a)))
        return
    if a.path is None:
        if a.model == "smollm2-135m":
            from minitune.demo_model import demo_model_path

            a.path = str(demo_model_path())
        else:
            a.path = str(make_checkpoint(a.model, Path(tempfile.gettempdir()) / f"minitune-bench-{a.model}-{a.dtype}", a.dtype))
    if a.seq_sweep:
        return sweep(a, argv)
    rows = []
    libs = ["minitune"] + (["transformers+peft"] if a.compare_hf else [])
    runs: dict[str, list[dict]] = {lib: [] for lib in libs}
    for _ in range(a.rounds):  # alternating, so that a slow spell of the machine hits both libraries
        for lib in libs:
            runs[lib].append(run_worker(Path(__file__), passthrough(a) + [f"--lib={'minitune' if lib == 'minitune' else 'hf'}"]))
    for lib in libs:
        rs = runs[lib]
        tok_s = statistics.median(r["tokens_per_s"] for r in rs)
        mem = max(r.get("peak_alloc_gib", r["peak_rss_gib"]) for r in rs)
        row = {"library": lib, "model": a.model, "mode": a.mode, "B x T": f"{a.batch}x{a.seq}", "gc": a.gc,
               "packed": a.packed, "tokens/s": tok_s, "peak GiB": mem, "first step s": rs[0]["first_step_s"]}
        if a.rounds > 1:
            row["tokens/s per round"] = " / ".join(f"{r['tokens_per_s']:.0f}" for r in rs)
        if lib == "minitune":
            row["options"] = options(a)
            row["predicted GiB"] = predict(a)
            row["pred/meas"] = row["predicted GiB"] / mem
            if a.live_peak and a.device == "cpu":
                live = run_worker(Path(__file__), passthrough(a) + ["--lib=minitune"],
                                  env={"MALLOC_MMAP_THRESHOLD_": "131072"})["peak_rss_gib"]
                row["live peak GiB"] = live
                row["pred/live"] = row["predicted GiB"] / live
        m = mfu(a, tok_s)
        if m is not None:
            row["MFU"] = m
            row["reserved GiB"] = max(r["peak_reserved_gib"] for r in rs)
        rows.append(row)
    if len(rows) == 2:
        rows.append({"library": "minitune / HF", "tokens/s": rows[0]["tokens/s"] / rows[1]["tokens/s"],
                     "peak GiB": rows[0]["peak GiB"] / rows[1]["peak GiB"]})
    cols = ["library", "model", "mode", "B x T", "gc", "packed", "options", "tokens/s", "peak GiB", "first step s",
            "predicted GiB", "pred/meas"] + (["live peak GiB", "pred/live"] if a.live_peak else []) \
        + (["tokens/s per round"] if a.rounds > 1 else [])
    if any("MFU" in r for r in rows):
        cols += ["MFU", "reserved GiB"]
    name = a.name or (f"memory_{a.model}_{a.mode}_{a.batch}x{a.seq}{'_gc' if a.gc else ''}{'_packed' if a.packed else ''}"
                      f"_{a.device.split(':')[0]}")
    save(name, rows, cols, "python benchmarks/memory.py " + " ".join(sys.argv[1:] if argv is None else argv), a.out)
    return rows


def passthrough(a, **override) -> list[str]:
    """The worker's command line for the configuration `a` (with `override`)."""
    v = dict(vars(a), **override)
    keys = ("model", "mode", "seq", "batch", "rank", "targets", "optim", "dtype", "device", "ce_chunk", "attention",
            "steps", "warmup", "path")
    return ([f"--{k.replace('_', '-')}={v[k]}" for k in keys]
            + [f"--{k}" for k in ("gc", "compile", "offload", "packed") if v[k]])


def options(a) -> str:
    on = [f"ce_chunk {a.ce_chunk}" if a.ce_chunk else "plain loss", a.attention]
    return ", ".join(on + [k for k in ("compile", "offload") if getattr(a, k)])


def sweep(a, argv) -> list[dict]:
    """Longest sequence (batch a.batch) whose measured peak stays under the budget: doubling from
    a.seq, then bisection between the last fit and the first miss down to a.sweep_step tokens.
    A run that fails (out of memory) counts as a miss."""
    budget = a.budget_gib
    rows: list[dict] = []

    def measure(seq: int) -> bool:
        try:
            r = run_worker(Path(__file__), passthrough(a, seq=seq, steps=1, warmup=1) + ["--lib=minitune"])
            mem = r.get("peak_alloc_gib", r["peak_rss_gib"])
            rows.append({"seq": seq, "peak GiB": mem, "tokens/s": r["tokens_per_s"], "fits": mem <= budget})
        except RuntimeError as e:
            oom = "out of memory" in str(e).lower()
            rows.append({"seq": seq, "peak GiB": float("nan"), "tokens/s": float("nan"), "fits": False,
                         "note": "out of memory" if oom else "failed"})
            if not oom:
                print(str(e)[-1500:], file=sys.stderr)
        print(f"seq {seq}: {rows[-1]}", flush=True)
        return rows[-1]["fits"]

    lo, hi = 0, None
    seq = a.seq
    while seq <= a.sweep_max:
        if not measure(seq):
            hi = seq
            break
        lo, seq = seq, seq * 2
    while hi is not None and hi - lo > a.sweep_step:
        mid = (lo + hi) // 2 // a.sweep_step * a.sweep_step or a.sweep_step
        if mid in (lo, hi):
            break
        if measure(mid):
            lo = mid
        else:
            hi = mid
    rows.sort(key=lambda r: r["seq"])
    summary = {"seq": f"longest under {budget:g} GiB: {lo if lo else 'none'}"}
    name = a.name or f"seq_sweep_{a.model}_{a.mode}_{a.device.split(':')[0]}"
    command = "python benchmarks/memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    save(name, rows + [summary], ["seq", "peak GiB", "tokens/s", "fits", "note"], command, a.out)
    plot_sweep(rows, budget, lo, f"{a.model} {a.mode}, {options(a)}{', gc' if a.gc else ''}", name, a.out)
    return rows


def plot_sweep(rows, budget, longest, title, name, out_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install minitune[plot]): no PNG")
        return
    from common import RESULTS

    ok = [r for r in rows if r["peak GiB"] == r["peak GiB"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["seq"] for r in ok], [r["peak GiB"] for r in ok], "o-", label="measured peak")
    ax.axhline(budget, color="red", linestyle="--", label=f"budget {budget:g} GiB")
    if longest:
        ax.axvline(longest, color="green", linestyle=":", label=f"longest fit {longest:,}")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("peak memory (GiB)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    path = Path(out_dir or RESULTS) / f"{name}.png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
