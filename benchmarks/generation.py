"""Generation speed: minitune's `generate` vs transformers' (+peft) `generate`, same weights, same
prompts, same number of new tokens (no early stop), in one run.

    python benchmarks/generation.py [--batch 8] [--new 64] [--repeats 3]          # CPU, SmolLM2-135M fp32, greedy
    python benchmarks/generation.py --shape llama2-7b --quant nf4 --lora --batch 16 64 --prompt-len 128 --new 128
                                                                                   # GPU: PPO's rollout shape

The --shape mode builds a random-weight checkpoint of that shape (memory.py's shapes), loads it in
both libraries (NF4 + double quant with --quant nf4, a LoRA adapter r=16 on all linear layers with
--lora, its B randomized so the adapter really computes), and samples (temperature 1) from random
prompts of --prompt-len tokens. It reports new tokens/s, ms per decode step and peak GPU memory.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

PROMPTS = ["Write a short poem about autumn.", "Explain what a hash table is.", "Give me three tips for sleeping well.",
           "What is the capital of Australia?", "Describe a cat to someone who has never seen one.",
           "How do airplanes stay in the air?", "Summarize the plot of Romeo and Juliet.", "List five fruits."]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[8])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shape", default=None, help="random-weight shape from memory.py (GPU mode), e.g. llama2-7b")
    ap.add_argument("--quant", default="none", choices=["none", "nf4"])
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--dtype", default=None, help="--shape mode: default bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--device", default=None)
    ap.add_argument("--path", default=None, help="--shape mode: an existing checkpoint folder of that shape")
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default=None)
    ap.add_argument("--compile", action="store_true", help="also measure minitune with the compiled decode step")
    a = ap.parse_args(argv)
    if a.shape:
        return shape_mode(a, argv)
    a.batch = a.batch[0]
    from transformers import AutoModelForCausalLM

    from minitune import generate, load_model, load_tokenizer
    from minitune.cpu_linear import pack_linears
    from minitune.demo_model import demo_model_path
    from minitune.generate import left_pad

    path = demo_model_path()
    tok = load_tokenizer(path)
    ours = load_model(path)
    # What the recipes run on CPU (`model.cpu_pack`, on by default there): linear layers through
    # oneDNN with packed weights, for the weight shapes that multiply faster so on this CPU. The
    # unpacked model beside it (MKL's sgemm, as transformers) shows what packing buys.
    n_packed = pack_linears(ours, only_faster=True)
    mkl = load_model(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
             for p in (PROMPTS * 4)[: a.batch]]
    ids, mask = left_pad(tok.encode_batch(texts), tok.pad_id)

    def run_ours(compile=False, model=ours):
        out = generate(model, ids, mask, max_new_tokens=a.new, eos_ids=[], pad_id=tok.pad_id,  # no early stop: same work
                       compile=compile)
        return int(out.mask.sum())

    def run_hf():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False,
                              pad_token_id=tok.pad_id)
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    libs = {"minitune": run_ours, "transformers": run_hf}
    if a.compile:
        libs["minitune compiled"] = lambda: run_ours(compile=True)
    if n_packed:
        libs["minitune unpacked (MKL linears)"] = lambda: run_ours(model=mkl)
    same = torch.equal(generate(ours, ids, mask, max_new_tokens=a.new, pad_id=tok.pad_id).tokens,
                       generate(mkl, ids, mask, max_new_tokens=a.new, pad_id=tok.pad_id).tokens)
    print(f"packed linear layers: {n_packed}; greedy tokens equal unpacked: {same}")
    for fn in libs.values():
        fn()  # warm-up (and compilation)
    # The libraries take turns within each repeat, and each ratio is the median of the per-repeat ratios: a
    # shared CPU drifts by tens of percent over minutes, which timing one library's repeats after the other's
    # turned into a ratio that moved between runs (1.59x, 1.52x, 1.37x on 2026-11-28).
    rates: dict[str, list[float]] = {name: [] for name in libs}
    for _ in range(a.repeats):
        for name, fn in libs.items():
            t0 = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t0))
    rows = [{"library": name, "batch": a.batch, "new tokens": a.new, "tokens/s": statistics.median(r)}
            for name, r in rates.items()]
    for name in libs:
        if name != "transformers":
            paired = [x / y for x, y in zip(rates[name], rates["transformers"])]
            rows.append({"library": f"{name} / transformers", "tokens/s": statistics.median(paired),
                         "range": f"{min(paired):.2f}-{max(paired):.2f}"})
    save(a.name or "generation_smollm2_cpu", rows, ["library", "batch", "new tokens", "tokens/s", "range"],
         "python benchmarks/generation.py " + " ".join(sys.argv[1:] if argv is None else argv), a.out)
    return rows


def shape_mode(a, argv) -> list[dict]:
    import tempfile

    from memory import make_checkpoint

    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = a.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    path = Path(a.path) if a.path else make_checkpoint(
        a.shape, Path(tempfile.gettempdir()) / f"minitune-bench-{a.shape}-{dtype_name}", dtype_name)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    rows = []
    libs = ("minitune", "minitune compiled", "transformers+peft") if a.compile else ("minitune", "transformers+peft")
    for lib in libs:
        model, run = _load_for_generation(lib, path, dev, dtype, dtype_name, a.quant, a.lora, targets)
        for batch in a.batch:
            g = torch.Generator().manual_seed(0)
            vocab = model.config.vocab_size
            ids = torch.randint(3, vocab, (batch, a.prompt_len), generator=g).to(dev)
            run(ids, a.new)  # warm-up: lazy initialisation, and compilation of this shape
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(a.repeats):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                run(ids, a.new)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            dt = statistics.median(times)
            row = {"library": lib, "batch": batch, "prompt": a.prompt_len, "new tokens": a.new,
                   "tokens/s": batch * a.new / dt, "ms/step": 1000 * dt / a.new}
            if dev.type == "cuda":
                row["peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
            rows.append(row)
        del model, run
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for batch in a.batch:
        hf = next(r for r in rows if r["library"] == "transformers+peft" and r["batch"] == batch)
        for lib in libs[:-1]:
            ours = next(r for r in rows if r["library"] == lib and r["batch"] == batch)
            rows.append({"library": f"{lib} / transformers+peft", "batch": batch, "tokens/s": ours["tokens/s"] / hf["tokens/s"]})
    name = a.name or f"generation_{a.shape}_{a.quant}{'_lora' if a.lora else ''}_{dev.type}"
    save(name, rows, ["library", "batch", "prompt", "new tokens", "tokens/s", "ms/step", "peak GiB"],
         "python benchmarks/generation.py " + " ".join(sys.argv[1:] if argv is None else argv), a.out)
    return rows


def _load_for_generation(lib, path, dev, dtype, dtype_name, quant, lora, targets):
    """(model with .config.vocab_size, run(ids, new_tokens)) for one library, LoRA B randomized."""
    if lib.startswith("minitune"):
        from minitune import generate, load_model
        from minitune.lora import LoRAConfig, LoRALinear, apply_lora
        from minitune.quant import QuantConfig

        model = load_model(path, dtype=dtype, device=dev,
                           quant=QuantConfig(compute_dtype=dtype_name) if quant == "nf4" else None).eval()
        if lora:
            apply_lora(model, LoRAConfig(r=16, alpha=32, target_modules=tuple(targets)))
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, LoRALinear):
                        m.adapters["default"].lora_B.normal_(0, 0.01)

        def run(ids, new):
            g = torch.Generator(device=ids.device).manual_seed(0)
            return generate(model, ids, max_new_tokens=new, eos_ids=[], pad_id=0, temperature=1.0, generator=g,
                            compile=lib == "minitune compiled")
        return model, run
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {}
    if quant == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": dev}, attn_implementation="sdpa", **kw)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01)
    model.eval()

    def run(ids, new):
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                  do_sample=True, temperature=1.0, top_k=0, pad_token_id=0)
    return model, run


if __name__ == "__main__":
    main()
