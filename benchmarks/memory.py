"""Peak memory and training throughput of one LoRA/QLoRA/full fine-tuning step, minitune vs
transformers+peft (`--compare-hf`), with minitune's own memory prediction beside the measurement.

    python benchmarks/memory.py --model smollm2-135m --mode lora --seq 256 --batch 4 --compare-hf
    python benchmarks/memory.py --model llama2-7b --mode qlora --seq 2048 --batch 1 --gc --compare-hf   # GPU

Each configuration runs in a fresh process, so peak RSS (CPU) and max_memory_allocated (GPU) belong
to that run alone. Random weights (memory and speed do not depend on values); the same checkpoint
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
from common import current_rss_bytes, peak_rss_bytes, run_worker, save  # noqa: E402

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
        if a.gc:
            apply_activation_checkpointing(model)

        def step_loss(ids):
            out = model(ids[:, :-1], return_logits=False)
            return cross_entropy_sum(out.hidden, ids[:, 1:], model.lm_head, a.ce_chunk) / ids[:, 1:].numel()
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

        def step_loss(ids):
            return model(input_ids=ids, labels=ids).loss
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if a.optim == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-5)
    else:
        import bitsandbytes as bnb

        opt = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[a.optim](params, lr=1e-5)
    load_rss = current_rss_bytes()
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(a.warmup + a.steps):
        ids = torch.randint(0, 32000, (a.batch, a.seq + 1), generator=g).to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step_loss(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    tok_s = a.batch * a.seq / statistics.median(times)
    out = {"tokens_per_s": tok_s, "peak_rss_gib": peak_rss_bytes() / 2**30, "base_rss_gib": base_rss / 2**30,
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
                      ce_chunk=a.ce_chunk, device=a.device.split(":")[0])
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
    ap.add_argument("--ce-chunk", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--compare-hf", action="store_true")
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
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                   if k in ("model", "mode", "seq", "batch", "rank", "targets", "optim", "dtype", "device", "ce_chunk",
                            "steps", "warmup", "path")] + (["--gc"] if a.gc else [])
    rows = []
    libs = ["minitune"] + (["transformers+peft"] if a.compare_hf else [])
    for lib in libs:
        r = run_worker(Path(__file__), passthrough + [f"--lib={'minitune' if lib == 'minitune' else 'hf'}"])
        mem = r.get("peak_alloc_gib", r["peak_rss_gib"])
        row = {"library": lib, "model": a.model, "mode": a.mode, "B x T": f"{a.batch}x{a.seq}", "gc": a.gc,
               "tokens/s": r["tokens_per_s"], "peak GiB": mem}
        if lib == "minitune":
            row["predicted GiB"] = predict(a)
            row["pred/meas"] = row["predicted GiB"] / mem
        m = mfu(a, r["tokens_per_s"])
        if m is not None:
            row["MFU"] = m
            row["reserved GiB"] = r["peak_reserved_gib"]
        rows.append(row)
    if len(rows) == 2:
        rows.append({"library": "minitune / HF", "tokens/s": rows[0]["tokens/s"] / rows[1]["tokens/s"],
                     "peak GiB": rows[0]["peak GiB"] / rows[1]["peak GiB"]})
    cols = ["library", "model", "mode", "B x T", "gc", "tokens/s", "peak GiB", "predicted GiB", "pred/meas"]
    if any("MFU" in r for r in rows):
        cols += ["MFU", "reserved GiB"]
    name = a.name or f"memory_{a.model}_{a.mode}_{a.batch}x{a.seq}{'_gc' if a.gc else ''}_{a.device.split(':')[0]}"
    save(name, rows, cols, "python benchmarks/memory.py " + " ".join(sys.argv[1:] if argv is None else argv), a.out)
    return rows


if __name__ == "__main__":
    main()
