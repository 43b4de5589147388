"""The SFT recipe end to end on a tiny model with the real tokenizer: determinism, exact resume
(also after a kill at an arbitrary step), SIGTERM, NaN, bad input, DDP and FSDP under torchrun."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minitune import MinituneError
from minitune.checkpoint import iter_safetensors
from minitune.train.config import load_config, parse_cli
from minitune.train.metrics import read_metrics
from helpers import PARALLEL, load_recipe, rank_pids, spawn_torchrun, tiny_with_real_tokenizer, torchrun

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
sft = load_recipe("lora_sft")


@pytest.fixture(scope="module")
def tiny(demo_dir, tmp_path_factory):
    return tiny_with_real_tokenizer(tmp_path_factory.mktemp("tiny") / "m", demo_dir)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Rows whose documents are exactly 16 tokens (15 digits + EOS): packed blocks then line up
    with rows, so any split of rows over ranks forms the same global batch."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "digits.jsonl"
    path.write_text("\n".join(json.dumps({"text": "".join(rng.choice("0123456789") for _ in range(15))})
                              for _ in range(200)))
    return path


def base_args(tiny, out, **extra):
    args = {"model.path": str(tiny), "run.output_dir": str(out), "run.progress": "false", "run.max_steps": 6,
            "run.batch_size": 2, "data.seq_length": 32, "data.synthetic_train": 200, "data.synthetic_eval": 8,
            "eval.max_new_tokens": 4, "lora.r": 4, "lora.dropout": 0.1, "optim.lr": 1e-2, "run.save_every": 2,
            "run.keep_last": 5}
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def run(args):
    return sft.train(parse_cli(sft.SFTConfig, args))


def losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


# Held-out loss drop after 6 steps at lr 1e-2, measured on this project's CPU for seeds 0/1/2:
# 0.226 / 0.353 / 0.283 (lr=0: exactly 0). The tests ask for half the smallest.
MIN_EVAL_DROP = 0.11


def test_loss_falls_and_runs_are_deterministic(tiny, tmp_path):
    first = run(base_args(tiny, tmp_path / "a"))
    run(base_args(tiny, tmp_path / "b"))
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == 6 and a == b
    assert a[-1] < a[0]
    assert first["eval_loss_before"] - first["eval_loss"] > MIN_EVAL_DROP
    cfg_saved = (tmp_path / "a" / "config.yaml").read_text()
    assert "r: 4" in cfg_saved
    assert (tmp_path / "a" / "adapter" / "adapter_config.json").exists()


def test_control_at_lr0_fails_the_learning_assertion(tiny, tmp_path):
    out = run(base_args(tiny, tmp_path / "lr0", **{"optim.lr": 0.0, "run.save_every": 0, "eval.accuracy": "false"}))
    assert not out["eval_loss_before"] - out["eval_loss"] > MIN_EVAL_DROP


def test_resume_continues_with_identical_losses(tiny, tmp_path):
    run(base_args(tiny, tmp_path / "full"))
    full = losses(tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000002"
    run(base_args(tiny, tmp_path / "resumed", **{"run.resume": str(ckpt)}))
    resumed = losses(tmp_path / "resumed")
    assert resumed == pytest.approx(full[2:], abs=1e-6)
    a = dict(iter_safetensors(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = dict(iter_safetensors(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_evaluations_every_n_steps_log_accuracy_and_a_resumed_run_starts_its_curve_at_the_checkpoint(tiny, tmp_path):
    """run.eval_every logs held-out loss and exact-match accuracy (synthetic task: eval_exact_match, as the
    RL recipes name it) at step 0 and every N steps, and the accuracy after the last step; a run resumed with
    it evaluates first at the checkpoint's step, with the figures the uninterrupted run logged there, and
    the evaluations do not change its training."""
    def evals(out):
        return {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r and "step" in r
                and "final_step" not in r}

    def accs(out):
        return {r["step"]: r["eval_exact_match"] for r in read_metrics(out / "metrics.jsonl") if "eval_exact_match" in r}

    run(base_args(tiny, tmp_path / "full", **{"run.eval_every": 2}))
    full_evals, full_accs = evals(tmp_path / "full"), accs(tmp_path / "full")
    assert sorted(full_evals) == [0, 2, 4] and sorted(full_accs) == [0, 2, 4, 6]
    run(base_args(tiny, tmp_path / "resumed", **{"run.eval_every": 2,
                                                  "run.resume": str(tmp_path / "full" / "checkpoints" / "step_00000002")}))
    resumed_evals, resumed_accs = evals(tmp_path / "resumed"), accs(tmp_path / "resumed")
    assert sorted(resumed_evals) == [2, 4] and sorted(resumed_accs) == [2, 4, 6]
    assert resumed_accs[6] == full_accs[6]
    for step in (2, 4):
        assert resumed_evals[step]["eval_loss"] == pytest.approx(full_evals[step]["eval_loss"], abs=1e-6)
        assert resumed_accs[step] == full_accs[step]
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "full")[2:], abs=1e-6)


def _spawn(args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "recipes" / "lora_sft.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(out, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(losses(out)) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_kill_at_an_arbitrary_step_then_resume(tiny, tmp_path):
    args = base_args(tiny, tmp_path / "ref", **{"run.max_steps": 10, "run.save_every": 1, "eval.accuracy": "false"})
    run(args)
    ref = losses(tmp_path / "ref")
    out = tmp_path / "killed"
    args = base_args(tiny, out, **{"run.max_steps": 10, "run.save_every": 1, "eval.accuracy": "false"})
    proc = _spawn(args)
    _wait_for_step(out, random.Random().randint(3, 6), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    done = [c for c in ckpts if not c.name.endswith(".tmp")]
    assert done, "no complete checkpoint survived"
    start = int(done[-1].name.split("_")[1])
    (out / "metrics.jsonl").unlink()
    run(args + ["run.resume=true"])
    assert losses(out) == pytest.approx(ref[start:], abs=1e-6)


def test_sigterm_saves_and_exits_cleanly(tiny, tmp_path):
    out = tmp_path / "term"
    proc = _spawn(base_args(tiny, out, **{"run.max_steps": 200, "run.save_every": 0, "eval.accuracy": "false"}))
    _wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, text
    assert "stopped by SIGTERM" in text
    step = len(losses(out))
    assert (out / "checkpoints" / f"step_{step:08d}" / "common.pt").exists()


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tiny, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(MinituneError, match=r"(loss|gradient norm) is (nan|inf) at step \d+: stopping before the optimizer step; "
                                            r"the last good checkpoint is"):
        run(base_args(tiny, out, **{"optim.lr": 1e12, "optim.grad_clip": 1e12, "run.save_every": 1,
                                    "run.max_steps": 50, "eval.accuracy": "false", "optim.warmup_steps": 0}))
    latest = sorted((out / "checkpoints").glob("step_*"))[-1]
    assert (latest / "adapter" / "adapter_model.safetensors").exists()


def test_bad_config_errors_before_compute(tiny, tmp_path):
    with pytest.raises(MinituneError, match=r"unknown config key 'lora.rank'; did you mean lora.r"):
        parse_cli(sft.SFTConfig, ["lora.rank=8"])
    with pytest.raises(MinituneError, match="optim.lr: expected a number"):
        parse_cli(sft.SFTConfig, ["optim.lr=fast"])
    with pytest.raises(MinituneError, match="unknown config key 'optm'; did you mean optim"):
        parse_cli(sft.SFTConfig, ["optm.lr=1"])
    with pytest.raises(MinituneError, match="model.path '/nope' does not exist"):
        run(base_args(tiny, tmp_path / "x", **{"model.path": "/nope"}))
    with pytest.raises(MinituneError, match="data.seq_length=4096 exceeds the model's context"):
        run(base_args(tiny, tmp_path / "y", **{"data.seq_length": 4096}))
    with pytest.raises(MinituneError, match="global_batch=5 is not divisible"):
        run(base_args(tiny, tmp_path / "z", **{"run.global_batch": 5}))
    run(base_args(tiny, tmp_path / "used", **{"run.max_steps": 1, "eval.accuracy": "false"}))
    with pytest.raises(MinituneError, match="already holds checkpoints"):
        run(base_args(tiny, tmp_path / "used", **{"run.max_steps": 1}))


def test_shipped_configs_load():
    classes = {"sft": sft.SFTConfig, "reward": load_recipe("reward_model").RewardConfig, "ppo": load_recipe("ppo").PPOConfig,
               "dpo": load_recipe("dpo").DPOConfig, "grpo": load_recipe("grpo").GRPOConfig}
    paths = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
    assert len(paths) >= 8
    for path in paths:
        load_config(classes[path.name.split("_")[0]], path)


def test_sections_are_the_library_configs_and_the_saved_config_is_what_ran(tiny, tmp_path):
    from minitune.lora import ALL_LINEAR, LoRAConfig
    from minitune.quant import QuantConfig, QuantType

    cfg = parse_cli(sft.SFTConfig, [])
    assert type(cfg.lora) is LoRAConfig and cfg.lora.target_modules == ALL_LINEAR and cfg.model.quant is None
    # `model.quant=nf4` is QuantConfig's defaults with that type; a mapping sets any of its fields
    short = parse_cli(sft.SFTConfig, ["model.quant=nf4"]).model.quant
    assert short == QuantConfig(quant_type=QuantType.NF4)
    full = parse_cli(sft.SFTConfig, ["model.quant.quant_type=fp4", "model.quant.blocksize=128",
                                     "model.quant.int8_threshold=5.0"]).model.quant
    assert (full.quant_type, full.blocksize, full.int8_threshold) == (QuantType.FP4, 128, 5.0)
    assert parse_cli(sft.SFTConfig, ["model.quant=nf4", "model.quant=none"]).model.quant is None
    with pytest.raises(MinituneError, match="model.quant.quant_type: 'nf5' is not one of"):
        parse_cli(sft.SFTConfig, ["model.quant=nf5"])
    with pytest.raises(MinituneError, match="quant.blocksize must be a power of two"):
        parse_cli(sft.SFTConfig, ["model.quant.blocksize=100"])
    with pytest.raises(MinituneError, match="lora.r must be a positive integer"):
        parse_cli(sft.SFTConfig, ["lora.r=0"])
    # on CPU a bf16 4-bit compute dtype is settled to fp32 before config.yaml is written
    run(base_args(tiny, tmp_path / "q", **{"model.quant": "nf4", "run.max_steps": 1, "eval.accuracy": "false"}))
    saved = load_config(sft.SFTConfig, tmp_path / "q" / "config.yaml")
    assert saved.model.quant == QuantConfig(quant_type=QuantType.NF4, compute_dtype="float32")


def _torchrun(args, nproc=2, timeout=600):
    torchrun(ROOT / "recipes" / "lora_sft.py", args, nproc, timeout=timeout)


def digits_args(tiny, digits, out, **extra):
    """3 steps on the digit rows, whose packed blocks line up with rows (see `digits`)."""
    return base_args(tiny, out, **{"data.source": str(digits), "data.template": "text", "data.seq_length": 16,
                                   "data.shuffle_buffer": 0, "lora.dropout": 0.0, "run.max_steps": 3, "run.save_every": 0,
                                   "eval.accuracy": "false", "data.holdout": 10, **extra})


@pytest.fixture(scope="module")
def single_process(tiny, digits, tmp_path_factory):
    """The eager single process on the global batch of 4 that the 2-rank runs split: its run folder."""
    out = tmp_path_factory.mktemp("single") / "run"
    run(digits_args(tiny, digits, out, **{"run.batch_size": 4}))
    return out


@pytest.mark.parametrize("parallel", PARALLEL)
def test_distributed_matches_single_process(tiny, digits, single_process, tmp_path, parallel):
    _torchrun(digits_args(tiny, digits, tmp_path / parallel, **{"run.batch_size": 2, "run.parallel": parallel}))
    assert losses(tmp_path / parallel) == pytest.approx(losses(single_process), abs=1e-5)
    a = dict(iter_safetensors(single_process / "adapter" / "adapter_model.safetensors"))
    b = dict(iter_safetensors(tmp_path / parallel / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("parallel", PARALLEL)
def test_compiled_layers_under_torchrun_match_the_eager_single_process(tiny, digits, single_process, tmp_path, parallel,
                                                                       monkeypatch):
    """model.compile (on by default on CUDA, where torchrun runs) composed with DDP / FSDP2: layers compiled
    before the wrapper, then 2 ranks of half the batch each give the eager single process's losses and adapter."""
    out = tmp_path / f"{parallel}_compiled"
    cache = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    _torchrun(digits_args(tiny, digits, out, **{"run.batch_size": 2, "run.parallel": parallel, "model.compile": "true"}))
    assert any(cache.rglob("*.py")), "inductor wrote no kernel: the layers did not compile"
    assert losses(out) == pytest.approx(losses(single_process), abs=1e-4)
    a = dict(iter_safetensors(single_process / "adapter" / "adapter_model.safetensors"))
    b = dict(iter_safetensors(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)



@pytest.mark.parametrize("parallel", PARALLEL)
def test_held_out_split_that_does_not_divide_over_the_ranks(tiny, digits, tmp_path, parallel):
    """9 held-out blocks on 2 ranks (5 and 4, batches of 2: 3 forwards against 2): under FSDP2 the rank that
    runs out repeats its last batch without counting it, so the run finishes (before, it hung in the second
    evaluation's all-gather) and its held-out loss is the single process's over all 9 blocks."""
    single = tmp_path / "single"
    run(digits_args(tiny, digits, single, **{"run.batch_size": 4, "data.holdout": 9}))
    out = tmp_path / parallel
    _torchrun(digits_args(tiny, digits, out, **{"run.batch_size": 2, "run.parallel": parallel, "data.holdout": 9}),
              timeout=300)
    want, got = (json.loads((d / "summary.json").read_text()) for d in (single, out))
    assert got["eval_loss_before"] == pytest.approx(want["eval_loss_before"], abs=1e-5)
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], abs=1e-5)


@pytest.mark.parametrize("parallel", PARALLEL)
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tiny, tmp_path, parallel):
    """A signal that reaches one rank only (or one rank first): the ranks decide together after each step,
    so both save the same step and exit cleanly. Before, the signalled rank saved and left while the other
    went on into the next step's collectives and waited there for ever."""
    out = tmp_path / parallel
    proc = spawn_torchrun(ROOT / "recipes" / "lora_sft.py",
                          base_args(tiny, out, **{"run.max_steps": 200, "run.save_every": 0, "eval.accuracy": "false",
                                                  "run.batch_size": 2, "run.parallel": parallel, "run.progress": "false"}))
    try:
        _wait_for_step(out, 2, proc)
        ranks = rank_pids(proc)
        os.kill(ranks[1], signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        for pid in ranks.values():  # where each rank waits (faulthandler), then stop the run
            os.kill(pid, signal.SIGABRT)
        stdout, stderr = proc.communicate(timeout=60)
        raise AssertionError("the ranks did not stop:\n" + stdout[-3000:] + stderr[-6000:]) from None
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    said = re.search(r"stopped by a signal to another rank at step (\d+)", stdout)
    assert said, stdout[-2000:]
    step = int(said.group(1))
    assert 2 <= step < 200 and len(losses(out)) == step
    assert (out / "checkpoints" / f"step_{step:08d}" / "common.pt").exists()

