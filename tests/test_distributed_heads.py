"""Reward and value heads train inside the DDP/FSDP module (`WithHead`): gradients equal the
single-process full batch's on every rank, and the reward, PPO and GRPO recipes run under torchrun;
GRPO's loss normalized over the global minibatch gives the full batch's gradient on every rank."""
import json
import math
import re
from pathlib import Path

import pytest
import torch

from minitune.checkpoint import iter_safetensors
from minitune.train.metrics import read_metrics
from helpers import NEEDS_FSDP_ON_CPU, PARALLEL, tiny_with_real_tokenizer, torchrun

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("parallel", PARALLEL)
def test_wrapped_head_gets_the_full_batch_gradient_on_every_rank(parallel):
    out = torchrun(Path(__file__).parent / "dist_head_grads.py", [parallel])
    assert out.stdout.count("gradients equal the full batch's") == 2, out.stdout


@NEEDS_FSDP_ON_CPU
def test_fsdp_averages_gradients_where_the_backend_sums_an_avg_reduce_scatter():
    """torch 2.7's gloo returned the sum for FSDP2's AVG reduce-scatter, so every gradient came out world_size
    times too large (Adam hides it, gradient clipping and the logged norms do not): played here by a
    reduce-scatter that always sums, which `apply_fsdp` detects and divides back."""
    out = torchrun(Path(__file__).parent / "dist_head_grads.py", ["fsdp", "avg-sums"])
    assert out.stdout.count("gradients equal the full batch's") == 2, out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("parallel", PARALLEL)
def test_reward_recipe_under_torchrun(demo_dir, tmp_path, parallel):
    # 7 held-out pairs one at a time: 4 forwards on rank 0 against 3 on rank 1, which under FSDP2 repeats its last
    # (uncounted) until rank 0 is done; before, the run hung in the evaluation
    tiny = tiny_with_real_tokenizer(tmp_path / "m", demo_dir)
    out = tmp_path / parallel
    torchrun(ROOT / "recipes" / "reward_model.py",
             [f"model.path={tiny}", "run.progress=false", "run.max_steps=3", "run.batch_size=2", "run.save_every=2",
              "data.synthetic_train=32", "data.synthetic_eval=7", "reward.eval_batch_size=1", "optim.lr=1e-2", "lora.r=4",
              f"run.parallel={parallel}", f"run.output_dir={out}"], timeout=300)
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    saved = dict(iter_safetensors(out / "adapter" / "adapter_model.safetensors"))
    ckpt = dict(iter_safetensors(out / "checkpoints" / "step_00000002" / "adapter" / "adapter_model.safetensors"))
    head = saved["base_model.model.score.weight"]
    assert head.shape == (1, 64) and torch.isfinite(head).all()
    assert not torch.equal(head, ckpt["base_model.model.score.weight"])  # the head trained on the last step


def ppo_under_torchrun(toy_folder, out, parallel, *args, timeout=600):
    """recipes/ppo.py on 2 CPU ranks with the toy model: 2 steps of 8 answers, 4-token answers, then `args`."""
    folder, prompts = toy_folder
    torchrun(ROOT / "recipes" / "ppo.py",
             [f"model.path={folder}", f"data.source={prompts}", "data.template=text", "run.progress=false",
              "init_adapter=", "lora.r=4", "ppo.rollout_batch=8", "ppo.mini_batch=4", "gen.min_new_tokens=4",
              "gen.max_new_tokens=4", "sample_every=0", "run.max_steps=2", "optim.lr=1e-2", f"run.parallel={parallel}",
              f"run.output_dir={out}", *args], timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", PARALLEL)
def test_ppo_with_a_value_head_under_torchrun(toy_folder, tmp_path, parallel):
    out = tmp_path / parallel
    ppo_under_torchrun(toy_folder, out, parallel, "reward.function=helpers:share_of_letter_a", "ppo.samples_per_prompt=1",
                       "ppo.group_baseline=false", "ppo.skip_equal_groups=false", "gen.greedy_member=false",
                       "ppo.use_value=true", "ppo.ppo_epochs=1", "run.save_every=1")
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "vf_loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["vf_loss"]) for r in rows)
    first, last = (dict(iter_safetensors(out / "checkpoints" / f"step_0000000{s}" / "adapter" / "adapter_model.safetensors"))
                   for s in (1, 2))
    w = "base_model.model.v_head.summary.weight"
    assert torch.isfinite(last[w]).all() and last[w].abs().sum() > 0  # the zero-initialized value head learned
    assert not torch.equal(first[w], last[w])
    final = dict(iter_safetensors(out / "adapter" / "adapter_model.safetensors"))  # gathered from both ranks
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", PARALLEL)
def test_ppo_skip_equal_groups_under_torchrun_keeps_ranks_in_step(toy_folder, tmp_path, parallel):
    # rank 0 has one prompt with signal, rank 1 none: rank 1 tops up with one of its skipped prompts, so both
    # run the same forwards and optimizer steps (without the top-up rank 0 waits in its backward forever)
    out = tmp_path / parallel
    ppo_under_torchrun(toy_folder, out, parallel, "reward.function=helpers:first_group_differs_on_rank0",
                       "ppo.samples_per_prompt=4", "ppo.group_baseline=true", "ppo.use_value=false",
                       "ppo.skip_equal_groups=true", "held_out.prompts=0", "run.save_every=0", timeout=300)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "trained_rows" in r]
    # the job's figures, not rank 0's: 1 of the 4 prompts carries signal, both ranks train 4 rows, and the scores
    # are rank 0's 0, 1, 2, 3, 0, 0, 0, 0 with rank 1's eight zeros
    assert [(r["signal_share"], r["trained_rows"]) for r in rows] == [(0.25, 8), (0.25, 8)]
    assert all(r["score_mean"] == 0.375 and r["score_std"] == pytest.approx(0.88506, abs=1e-5) for r in rows)
    assert all(math.isfinite(r["kl"]) and math.isfinite(r["pg_loss"]) for r in rows)


@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_grpo_loss_over_ranks_gives_the_full_minibatch_gradient(parallel, aggregation):
    """Ranks holding different numbers of trained tokens (one rank's first group scored alike): with
    `global_counts` the averaged gradient is the whole minibatch's token-mean (sequence-mean) gradient, and
    with `global_token_means` the logged clip shares, KL and ratio are the whole minibatch's."""
    out = torchrun(Path(__file__).parent / "dist_grpo_grads.py", [parallel, aggregation])
    assert out.stdout.count("gradients equal the full batch's") == 2 and out.stdout.count("statistics too") == 2, out.stdout


@pytest.mark.parametrize("parallel", PARALLEL)
def test_generation_keeps_sharded_ranks_in_step(parallel):
    """Answers that end at different steps on different ranks (early EOS on one; a smaller budget on one):
    under FSDP2 every rank decodes until all ranks' answers are done, with the tokens of the unwrapped model;
    without that the run hangs (seen: rank 0 stopped after 8 of rank 1's 40 forwards and both waited forever,
    in the test and in recipes/grpo.py under FSDP2 with answers of mixed lengths)."""
    out = torchrun(Path(__file__).parent / "dist_generate.py", [parallel], timeout=180)
    assert out.stdout.count("as the plain model's") == 4, out.stdout
    if parallel == "fsdp":
        assert out.stdout.count("(ranks: 40 to 40)") == 4, out.stdout


@pytest.mark.slow
@NEEDS_FSDP_ON_CPU
@pytest.mark.parametrize("recipe", ["grpo.py", "ppo.py"])
def test_rl_recipes_under_fsdp_with_answers_of_mixed_lengths(toy_folder, tmp_path, recipe):
    """Each rank draws its answers' budget from [gen.min_new_tokens, gen.max_new_tokens] and its answers end
    where they end: under FSDP2 the rollouts and the held-out check must still run every rank's forwards in
    step (before `generate` kept them so, the GRPO run hung at its first rollout)."""
    folder, prompts = toy_folder
    out = tmp_path / recipe
    shape = ["grpo.rollout_batch=8", "grpo.group_size=4"] if recipe == "grpo.py" else \
        ["ppo.rollout_batch=8", "ppo.mini_batch=4", "ppo.samples_per_prompt=4"]
    torchrun(ROOT / "recipes" / recipe,
             [f"model.path={folder}", f"data.source={prompts}", "data.template=text", "run.progress=false", "init_adapter=",
              "lora.r=4", "gen.min_new_tokens=1", "gen.max_new_tokens=40", "gen.temperature=1.5",
              "reward.function=helpers:share_of_letter_a", "held_out.prompts=4", "run.max_steps=3", "run.save_every=0",
              "optim.lr=1e-2", "run.parallel=fsdp", f"run.output_dir={out}", *shape], timeout=240)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "score_mean" in r]
    assert len(rows) == 3 and len({r["response_length"] for r in rows}) > 1, rows


def test_step_metrics_are_the_whole_jobs():
    """`metrics_over_ranks`: means over the ranks that measured a metric, sums for counts, the largest for
    durations, order of names free; `std_over_ranks` pools the ranks' values; different names raise on every rank."""
    out = torchrun(Path(__file__).parent / "dist_metrics.py", [])
    assert out.stdout.count("metrics over ranks ok") == 2, out.stdout


def test_grpo_loss_with_each_ranks_own_counts_would_not():
    """The control: each rank dividing by its own counts (the mean of the ranks' means) is off by more than
    a third of the largest gradient, and rank 0's own statistics are not the full batch's, so the test above
    can fail."""
    out = torchrun(Path(__file__).parent / "dist_grpo_grads.py", ["ddp", "token", "local"])
    diffs = [(float(d), float(big)) for d, big in re.findall(r"max diff ([0-9.e+-]+) \(largest gradient ([0-9.e+-]+)\)",
                                                               out.stdout)]
    assert len(diffs) == 2 and all(d > big / 3 for d, big in diffs), out.stdout
    own = [float(x) for x in re.findall(r"own statistics off by ([0-9.e+-]+)", out.stdout)]
    assert len(own) == 2 and min(own) > 1e-2, out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("parallel", PARALLEL)
def test_grpo_under_torchrun_keeps_ranks_in_step(toy_folder, tmp_path, parallel):
    """recipes/grpo.py on 2 CPU ranks where only rank 0 has a group that carries signal: rank 1 keeps its
    skipped groups at weight 0, so both run the same forwards and optimizer steps (no rank waits forever),
    the KL term's reference pass runs on both, and the adapter gathered at the end is the last checkpoint's."""
    folder, prompts = toy_folder
    out = tmp_path / parallel
    torchrun(ROOT / "recipes" / "grpo.py",
             [f"model.path={folder}", f"data.source={prompts}", "data.template=text", "run.progress=false",
              "init_adapter=", "lora.r=4", "grpo.rollout_batch=8", "grpo.group_size=4", "gen.min_new_tokens=4",
              "gen.max_new_tokens=4", "gen.greedy_member=false", "reward.function=helpers:first_group_differs_on_rank0",
              "held_out.prompts=0", "run.max_steps=2", "run.save_every=1", "optim.lr=1e-2", f"run.parallel={parallel}",
              f"run.output_dir={out}"], timeout=300)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "informative_groups" in r]
    assert [r["informative_groups"] for r in rows] == [0.25, 0.25]  # 1 of the 4 groups over both ranks
    assert all(r["score_mean"] == 0.375 and r["score_std"] == pytest.approx(0.88506, abs=1e-5) for r in rows)
    assert all(r["updated"] and math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in rows)
    first, last = (dict(iter_safetensors(out / "checkpoints" / f"step_0000000{s}" / "adapter" / "adapter_model.safetensors"))
                   for s in (1, 2))
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the second step trained
    final = dict(iter_safetensors(out / "adapter" / "adapter_model.safetensors"))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", PARALLEL)
def test_dpo_under_torchrun(demo_dir, tmp_path, parallel):
    """recipes/dpo.py on 2 CPU ranks (each its share of the pairs; the reference is the same base with the
    adapter off on every rank; 7 held-out pairs one at a time, 4 on rank 0 and 3 on rank 1, which under FSDP2
    repeats its last, uncounted, so both run as many forwards): finite losses, log 2 at the start, the policy moved."""
    tiny = tiny_with_real_tokenizer(tmp_path / "m", demo_dir)
    out = tmp_path / parallel
    torchrun(ROOT / "recipes" / "dpo.py",
             [f"model.path={tiny}", "run.progress=false", "run.max_steps=3", "run.batch_size=2", "run.save_every=0",
              "data.synthetic_train=32", "data.synthetic_eval=7", "dpo.eval_batch_size=1", "data.seq_length=64",
              "optim.lr=1e-2", "optim.warmup_steps=0", "lora.r=4", "init_adapter=", "eval_accuracy=false", "dpo.beta=0.5",
              f"run.parallel={parallel}", f"run.output_dir={out}"], timeout=300)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r and "final_step" not in r]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-4  # step 1: policy = reference, the sigmoid loss is log 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_pairs_per_rank"] == 4
    assert abs(summary["before"]["eval_loss"] - math.log(2)) < 1e-4 and summary["before"]["eval_kl"] == 0
    assert math.isfinite(summary["after"]["eval_loss"]) and summary["after"]["eval_kl"] > 0  # the policy moved
    adapter = dict(iter_safetensors(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
