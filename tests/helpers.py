"""Tiny configs shared by the tests: one per model family, 2 layers, width 64."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from minitune.distributed import fsdp_runs_on

# FSDP2 runs on CPU only from torch 2.7 (`fsdp_runs_on`); the torchrun tests' parallel modes.
NEEDS_FSDP_ON_CPU = pytest.mark.skipif(not fsdp_runs_on(torch.device("cpu")),
                                       reason=f"FSDP2 has no CPU support in torch {torch.__version__}")
PARALLEL = ["ddp", pytest.param("fsdp", marks=NEEDS_FSDP_ON_CPU)]

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {
    "llama2": dict(model_type="llama", **TINY),
    "llama3": dict(model_type="llama", rope_theta=500000.0, **TINY,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral": dict(model_type="mistral", sliding_window=None, **TINY),
    "qwen2": dict(model_type="qwen2", **TINY),
    "smollm2": dict(model_type="llama", tie_word_embeddings=True, **TINY),
}


def make_hf_model(family: str, seed: int = 0):
    """A randomly initialised transformers model of the named tiny family (fp32, eval)."""
    kwargs = dict(FAMILIES[family])
    model_type = kwargs.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # biases are zero-initialised; randomise so that they are tested too
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def tiny_minitune_model(tmp_path, family="llama2", seed=0):
    """A minitune model loaded from a tiny HF checkpoint written into tmp_path."""
    from minitune import load_model

    hf = make_hf_model(family, seed)
    hf.save_pretrained(tmp_path / family)
    return load_model(tmp_path / family), hf


def tiny_with_real_tokenizer(folder, demo_dir, seed=0):
    """A 2-layer, width-64 Llama with SmolLM2's real tokenizer files: recipes run end to end in seconds."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(demo_dir / name, folder / name)
    return folder


def load_recipe(name):
    """Imports recipes/<name>.py as a module (recipes are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = mod  # dataclasses resolve postponed annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


# Toy reward functions for the PPO tests (named in configs as helpers:<name>).
def share_of_letter_a(responses, references):
    return [sum(c == "a" for c in r) / max(len(r), 1) for r in responses]


def reward_raises(responses, references):
    raise ValueError("boom")


def reward_nan(responses, references):
    return [float("nan")] * len(responses)


def reward_wrong_shape(responses, references):
    return [1.0]


def constant_reward(responses, references):
    return [0.5] * len(responses)


def first_group_differs_on_rank0(responses, references):
    """Under torchrun with 4 answers per prompt: on rank 0 the first prompt's answers score 0, 1, 2, 3 and every
    other answer 0; on the other ranks every answer 0. With ppo.skip_equal_groups rank 0 keeps one prompt
    and the others none, unless they are topped up to rank 0's count."""
    import os

    if os.environ.get("RANK", "0") != "0":
        return [0.0] * len(responses)
    return [float(i) if i < 4 else 0.0 for i in range(len(responses))]


def spawn_torchrun(script, args, nproc=2, **popen):
    """Starts `script` under torchrun with `nproc` CPU ranks (gloo), one thread each; returns the Popen."""
    import os
    import random
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + random.randint(0, 400)), str(script), *map(str, args)]
    # faulthandler: a rank sent SIGABRT prints where it is (what a test does with a run that hangs)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1",
               PYTHONPATH=os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def rank_pids(proc) -> dict[int, int]:
    """{rank: pid} of the ranks a torchrun Popen started (read from /proc: the children whose RANK is set)."""
    from pathlib import Path

    found = {}
    for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        if "RANK" in env:
            found[int(env["RANK"])] = int(pid)
    return found


def torchrun(script, args, nproc=2, timeout=600):
    """Runs `script` (a recipe or a test script) under torchrun with `nproc` CPU ranks (gloo);
    fails with the output's tail when any rank fails or the run does not finish in `timeout` s."""
    import subprocess
    from pathlib import Path

    proc = spawn_torchrun(script, args, nproc)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM: torchrun stops its ranks and exits (SIGKILL would leave them waiting on each other for ever,
        # holding the pipes this reads)
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=60)
        raise AssertionError(f"{Path(script).name} did not finish in {timeout} s (a rank waiting on the others?)\n"
                             + stdout[-3000:] + stderr[-3000:]) from None
    res = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def lora_generation_model(n_kv: int = 2):
    """A tiny minitune model (n_kv kv heads, vocabulary 96) with a LoRA adapter on every linear
    layer, B nonzero so the adapter changes what is generated."""
    from minitune import build_model
    from minitune.lora import LoRAConfig, LoRALinear, apply_lora
    from minitune.model import ModelConfig

    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=128)
    m = build_model(cfg, seed=0).eval()
    apply_lora(m, LoRAConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for layer in m.modules():
            if isinstance(layer, LoRALinear):
                layer.adapters["default"].lora_B.normal_(0, 0.2)
    return m
