"""PPO pieces against straightforward float64 loop references, and the recipe on a toy reward."""
import math
from pathlib import Path

import pytest
import torch

from minitune.ppo import (AdaptiveKLController, KLEstimator, gae, kl_per_token, leave_one_out_baseline, masked_mean,
                          masked_var, per_token_rewards, ppo_losses, whiten)
from minitune.errors import MinituneError
from minitune.train.config import parse_cli
from helpers import load_recipe


def gae_reference(rewards, values, lengths, gamma, lam):
    B, R = len(rewards), len(rewards[0])
    adv = [[0.0] * R for _ in range(B)]
    for b in range(B):
        n = lengths[b]
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            last = delta + gamma * lam * last
            adv[b][t] = last
    ret = [[adv[b][t] + (values[b][t] if t < lengths[b] else 0.0) for t in range(R)] for b in range(B)]
    return adv, ret


def test_gae_matches_loop_reference_with_padding():
    torch.manual_seed(0)
    B, R = 4, 7
    lengths = [7, 3, 5, 1]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(R)] for n in lengths], dtype=torch.float64)
    rewards = torch.randn(B, R, dtype=torch.float64) * mask
    values = torch.randn(B, R, dtype=torch.float64)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)]:
        adv, ret = gae(rewards, values, mask, gamma, lam)
        ref_adv, ref_ret = gae_reference(rewards.tolist(), values.tolist(), lengths, gamma, lam)
        assert torch.allclose(adv, torch.tensor(ref_adv, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(ret, torch.tensor(ref_ret, dtype=torch.float64), atol=1e-12)


def test_score_lands_on_last_generated_token_and_kl_everywhere():
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]])
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0]])
    rewards, non_score = per_token_rewards(torch.tensor([1.0, -2.0]), kl * mask, mask, kl_coef=0.5)
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1, 1 - 0.15, 0], [-2.25, 0, 0, 0]]))
    assert torch.allclose(non_score.sum(1), torch.tensor([-0.3, -0.25]))


def test_losses_match_loop_reference():
    torch.manual_seed(1)
    B, R = 3, 5
    mask = torch.tensor([[1.0] * 5, [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float64)
    logp, old = torch.randn(B, R, dtype=torch.float64) * 0.3, torch.randn(B, R, dtype=torch.float64) * 0.3
    v, old_v = torch.randn(B, R, dtype=torch.float64), torch.randn(B, R, dtype=torch.float64)
    adv, ret = torch.randn(B, R, dtype=torch.float64), torch.randn(B, R, dtype=torch.float64)
    pg, vf, st = ppo_losses(logp, old, v, old_v, adv, ret, mask, cliprange=0.2, cliprange_value=0.2)
    pg_terms, vf_terms, clipped = [], [], 0
    for b in range(B):
        for t in range(R):
            if mask[b, t] == 0:
                continue
            r = math.exp(logp[b, t] - old[b, t])
            a = adv[b, t].item()
            pg_terms.append(max(-a * r, -a * min(max(r, 0.8), 1.2)))
            clipped += (-a * min(max(r, 0.8), 1.2)) > (-a * r)
            vc = old_v[b, t] + min(max(v[b, t] - old_v[b, t], -0.2), 0.2)
            vf_terms.append(max((v[b, t] - ret[b, t]) ** 2, (vc - ret[b, t]) ** 2).item())
    assert pg.item() == pytest.approx(sum(pg_terms) / len(pg_terms), abs=1e-12)
    assert vf.item() == pytest.approx(0.5 * sum(vf_terms) / len(vf_terms), abs=1e-12)
    assert st.pg_clipfrac.item() == pytest.approx(clipped / len(pg_terms))


def test_kl_estimators():
    lp, rp = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    assert torch.allclose(kl_per_token(lp, rp, KLEstimator.KL), torch.tensor([[0.5, -1.0]]))
    assert torch.allclose(kl_per_token(lp, rp, KLEstimator.ABS), torch.tensor([[0.5, 1.0]]))
    assert torch.allclose(kl_per_token(lp, rp, KLEstimator.MSE), torch.tensor([[0.125, 0.5]]))
    logits, ref = torch.randn(1, 2, 10), torch.randn(1, 2, 10)
    full = kl_per_token(lp, rp, KLEstimator.FULL, logits, ref)
    exact = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=logits),
                                              torch.distributions.Categorical(logits=ref))
    assert torch.allclose(full, exact, atol=1e-6)


def test_masked_whitening_uses_unbiased_variance():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    assert masked_var(x, m).item() == pytest.approx(1.0)  # unbiased: ((1)+(0)+(1)) / 2
    w = whiten(x, m)
    assert torch.allclose(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-4)


def test_leave_one_out_baseline_matches_loop_reference():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 2.0, -1.0], dtype=torch.float64)
    k = 4
    ref = []
    for i, s in enumerate(scores.tolist()):
        g = i // k
        others = [scores[j].item() for j in range(g * k, g * k + k) if j != i]
        ref.append(s - sum(others) / len(others))
    out = leave_one_out_baseline(scores, k)
    assert torch.allclose(out, torch.tensor(ref, dtype=torch.float64), atol=1e-12)
    assert torch.equal(out[4:8], torch.zeros(4, dtype=torch.float64))  # all answers alike: no push
    from minitune import MinituneError

    with pytest.raises(MinituneError, match="groups"):
        leave_one_out_baseline(scores, 5)
    with pytest.raises(MinituneError, match="groups"):
        leave_one_out_baseline(scores, 1)


def test_adaptive_kl_controller():
    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    c.update(12.0, 256)  # error clipped to +0.2
    assert c.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    c2 = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    c2.update(3.0, 100)  # error -0.5 clipped to -0.2
    assert c2.value == pytest.approx(0.2 * (1 - 0.2 * 100 / 10000))
    c3 = AdaptiveKLController(0.1, target=4.0, horizon=32, minimum=0.1)
    c3.update(1.0, 16)  # would drop to 0.09: held at the floor
    assert c3.value == 0.1
    c3.update(8.0, 16)  # above target it still rises: 0.1 * 1.1
    assert c3.value == pytest.approx(0.11)


# Last-5 minus first-5 mean toy score, averaged over seeds 0-2, measured on this project's CPU at
# lr 3e-3 and 45 steps: trl +0.060 (+0.060, +0.061, +0.060), rloo +0.049 (+0.053, +0.047, +0.048);
# lr=0 controls -0.013 to +0.002. One seed moved +0.040 at 30 steps on one CPU and +0.05 on another,
# so a single 30-step run was a coin toss. The tests ask for half the smaller mean.
TOY_SEEDS = (0, 1, 2)
MIN_TOY_EFFECT = 0.025


def toy_ppo_effect(toy_folder, out: Path, path: str, lr: float) -> tuple[float, list[dict]]:
    """Mean over TOY_SEEDS of (last-5 minus first-5 mean score) in 45 PPO steps on the toy reward,
    and each run's summary. trl: one response per prompt, value head on the shared trunk, GAE.
    rloo: the CPU default's path, 4 responses per prompt, leave-one-out baseline, no value function."""
    folder, prompts = toy_folder
    ppo = load_recipe("ppo")
    mode = {"trl": ["ppo.samples_per_prompt=1", "ppo.group_baseline=false", "ppo.value_detach=false",
                    "ppo.use_value=true"],
            "rloo": ["ppo.samples_per_prompt=4", "ppo.group_baseline=true", "ppo.use_value=false"]}[path]
    mode += ["ppo.skip_equal_groups=false", "gen.greedy_member=false", "gen.temperature=1.0"]  # as calibrated
    effects, runs = [], []
    for seed in TOY_SEEDS:
        args = mode + [f"model.path={folder}", f"data.source={prompts}", "data.template=text", "run.progress=false",
                       "run.save_every=0", "ppo.rollout_batch=32", "ppo.mini_batch=16", "ppo.ppo_epochs=4",
                       "gen.min_new_tokens=8", "gen.max_new_tokens=8", "ppo.init_kl_coef=0.05", "init_adapter=",
                       "reward.function=helpers:share_of_letter_a", "lora.r=8", "ppo.adaptive_kl=false",
                       "sample_every=0", f"optim.lr={lr}", "run.max_steps=45", f"run.seed={seed}",
                       f"run.output_dir={out / f'{path}_{lr}_{seed}'}"]
        runs.append(ppo.train(parse_cli(ppo.PPOConfig, args)))
        scores = [h["score_mean"] for h in runs[-1]["history"]]
        effects.append(sum(scores[-5:]) / 5 - sum(scores[:5]) / 5)
    return sum(effects) / len(effects), runs


@pytest.mark.slow
@pytest.mark.parametrize("path", ["trl", "rloo"])
def test_ppo_raises_a_toy_reward_with_one_base(toy_folder, tmp_path, path):
    effect, runs = toy_ppo_effect(toy_folder, tmp_path, path, lr=3e-3)
    assert effect > MIN_TOY_EFFECT, effect
    for out in runs:
        assert all(math.isfinite(h["kl"]) for h in out["history"])
        assert max(abs(h["kl"]) for h in out["history"]) < 10.0  # KL stays bounded
    # one base: PPO holds the same base parameter storage as SFT on the same model
    folder, prompts = toy_folder
    sft = load_recipe("lora_sft")
    sft_out = sft.train(parse_cli(sft.SFTConfig, [f"model.path={folder}", f"data.source={prompts}", "data.template=text",
                                                  "data.text_column=prompt", "run.max_steps=1", "run.progress=false",
                                                  "data.seq_length=8", "data.holdout=4", "eval.accuracy=false",
                                                  f"run.output_dir={tmp_path / 'sft'}"]))
    assert out["base_param_bytes"] == sft_out["base_param_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("path", ["trl", "rloo"])
def test_ppo_toy_control_at_lr0_fails_the_same_assertion(toy_folder, tmp_path, path):
    effect, runs = toy_ppo_effect(toy_folder, tmp_path, path, lr=0.0)
    assert not effect > MIN_TOY_EFFECT, effect
    assert all(abs(h["kl"]) < 1e-5 for out in runs for h in out["history"])  # the policy never left the reference


def test_without_a_value_function_the_head_is_untouched_and_advantages_are_returns(toy_folder, tmp_path, monkeypatch):
    # ppo.use_value=false (the CPU default's RLOO): no value loss, values taken as 0, so GAE gives each
    # token its return (the RLOO score plus the KL penalties still ahead) whatever lam says
    from safetensors.torch import load_file

    folder, prompts = toy_folder
    ppo = load_recipe("ppo")
    seen = []
    import minitune.ppo as ppo_lib

    real_gae = ppo_lib.gae
    monkeypatch.setattr(ppo_lib, "gae", lambda r, v, m, g, lam: seen.append((r, v, m, lam)) or real_gae(r, v, m, g, lam))
    args = [f"model.path={folder}", f"data.source={prompts}", "data.template=text", "run.progress=false",
            "run.max_steps=2", "run.save_every=2", "ppo.rollout_batch=8", "ppo.mini_batch=4", "ppo.samples_per_prompt=4",
            "ppo.group_baseline=true", "ppo.use_value=false", "ppo.skip_equal_groups=false", "ppo.lam=0.5", "gen.min_new_tokens=4",
            "gen.max_new_tokens=4", "init_adapter=", "optim.lr=1e-2", "reward.function=helpers:share_of_letter_a",
            f"run.output_dir={tmp_path / 'o'}"]
    out = ppo.train(parse_cli(ppo.PPOConfig, args))
    rewards, values, mask, lam = seen[-1]
    assert lam == 1.0 and values.eq(0).all()
    returns = torch.flip(torch.cumsum(torch.flip(rewards * mask, [1]), 1), [1]) * mask  # gamma 1: sum of what is left
    _, ret = real_gae(rewards, values, mask, 1.0, 1.0)
    assert torch.allclose(ret, returns, atol=1e-6)
    heads = load_file(Path(out["last_checkpoint"]) / "adapter" / "adapter_model.safetensors")
    assert all(v.eq(0).all() for k, v in heads.items() if "v_head" in k)  # the value head was never trained
    assert any("v_head" in k for k in heads)
    # the run's result as a PEFT folder, as every recipe saves it: the last checkpoint's policy, no value head
    final = load_file(tmp_path / "o" / "adapter" / "adapter_model.safetensors")
    assert final.keys() == {k for k in heads if "v_head" not in k} and any("lora_B" in k for k in final)
    assert all(torch.equal(final[k], heads[k]) for k in final)
    assert any(final[k].abs().sum() > 0 for k in final if "lora_B" in k)  # trained at lr 1e-2
    # the step's time split is logged: generation, scoring, update, and their shares
    for h in out["history"]:
        assert "vf_loss" not in h and "explained_variance" not in h  # no value function, nothing to report
        assert min(h["gen_s"], h["score_s"], h["update_s"]) > 0
        assert h["gen_share"] + h["score_share"] + h["update_share"] == pytest.approx(1.0)


def test_skip_equal_groups_trains_only_prompts_whose_answers_differ(toy_folder, tmp_path, monkeypatch):
    # ppo.skip_equal_groups: the log-prob forwards and the update see only the prompts whose 4 answers
    # scored differently; with a reward that scores everything alike nothing trains and the adapter stays
    from safetensors.torch import load_file

    folder, prompts = toy_folder
    ppo = load_recipe("ppo")
    seen = []
    real_scores, real_traj = ppo.scores_for, ppo.trajectory

    def scores_for(*a):
        out = real_scores(*a)
        seen.append(("scores", out[0]))
        return out

    monkeypatch.setattr(ppo, "scores_for", scores_for)
    monkeypatch.setattr(ppo, "trajectory", lambda p, r, seq, *a, **kw: seen.append(("rows", len(seq))) or
                        real_traj(p, r, seq, *a, **kw))
    base = [f"model.path={folder}", f"data.source={prompts}", "data.template=text", "run.progress=false",
            "run.save_every=3", "ppo.rollout_batch=16", "ppo.mini_batch=8", "ppo.samples_per_prompt=4",
            "ppo.group_baseline=true", "ppo.use_value=false", "ppo.skip_equal_groups=true", "gen.min_new_tokens=3",
            "gen.max_new_tokens=3", "init_adapter=", "optim.lr=1e-2", "held_out.prompts=0", "run.max_steps=3"]
    out = ppo.train(parse_cli(ppo.PPOConfig, base + ["reward.function=helpers:share_of_letter_a",
                                                     f"run.output_dir={tmp_path / 'a'}"]))
    checked = 0
    for scores, h in zip([v for k, v in seen if k == "scores"], out["history"], strict=True):
        g = scores.view(-1, 4)
        informative = int((g != g[:, :1]).any(1).sum())
        assert h["trained_rows"] == 4 * informative and h["signal_share"] == informative / 4
        checked += informative
    assert [v for k, v in seen if k == "rows"] == [h["trained_rows"] for h in out["history"] if h["trained_rows"]]
    assert checked > 0  # the toy reward's answers differ often: something was trained
    seen.clear()
    out = ppo.train(parse_cli(ppo.PPOConfig, base + ["reward.function=helpers:constant_reward",
                                                     f"run.output_dir={tmp_path / 'c'}"]))
    assert [h["trained_rows"] for h in out["history"]] == [0, 0, 0] and not any(k == "rows" for k, _ in seen)
    assert not any("kl" in h or "pg_loss" in h for h in out["history"])  # nothing measured: left out, not NaN
    weights = load_file(Path(out["last_checkpoint"]) / "adapter" / "adapter_model.safetensors")
    assert all(v.eq(0).all() for k, v in weights.items() if "lora_B" in k)  # never updated from its zero init


@pytest.mark.slow
@pytest.mark.parametrize("path", ["trl", "rloo"])
def test_resume_equals_the_uninterrupted_run(toy_folder, tmp_path, path):
    # 4 steps in one go, and steps 3-4 again from the step-2 checkpoint in another folder: the same rollout
    # scores, KL and losses, and the same final adapter (policy, value head, optimizer, KL controller, score
    # moments, prompt cursor and the sampler's random state all come back)
    from safetensors.torch import load_file
    from minitune.train.metrics import read_metrics

    folder, prompts = toy_folder
    ppo = load_recipe("ppo")
    mode = {"trl": ["ppo.samples_per_prompt=1", "ppo.group_baseline=false", "ppo.use_value=true",
                    "ppo.skip_equal_groups=false", "gen.greedy_member=false", "ppo.adaptive_kl=true",
                    "ppo.ppo_epochs=2"],
            "rloo": ["ppo.samples_per_prompt=4", "ppo.group_baseline=true", "ppo.use_value=false",
                     "ppo.skip_equal_groups=true", "ppo.score_norm=true"]}[path]
    args = mode + [f"model.path={folder}", f"data.source={prompts}", "data.template=text", "run.progress=false",
                   "init_adapter=", "reward.function=helpers:share_of_letter_a", "lora.r=4", "ppo.rollout_batch=8",
                   "ppo.mini_batch=4", "gen.min_new_tokens=3", "gen.max_new_tokens=6", "held_out.prompts=0",
                   "sample_every=0", "run.max_steps=4", "run.save_every=2", "optim.lr=1e-2"]
    ppo.train(parse_cli(ppo.PPOConfig, args + [f"run.output_dir={tmp_path / 'a'}"]))
    ppo.train(parse_cli(ppo.PPOConfig, args + [f"run.output_dir={tmp_path / 'b'}",
                                               f"run.resume={tmp_path / 'a' / 'checkpoints' / 'step_00000002'}"]))
    keys = ("score_mean", "kl", "pg_loss", "kl_coef", "response_length")
    rows = {r: [{k: m.get(k) for k in keys} for m in read_metrics(tmp_path / r / "metrics.jsonl") if "score_mean" in m]
            for r in "ab"}
    assert len(rows["a"]) == 4 and len(rows["b"]) == 2
    for x, y in zip(rows["a"][2:], rows["b"]):
        assert x.keys() == y.keys() and all(y[k] == pytest.approx(x[k], abs=1e-6) for k in x), (x, y)
    wa, wb = (load_file(tmp_path / r / "adapter" / "adapter_model.safetensors") for r in "ab")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_reward_function_errors_are_named(toy_folder, tmp_path):
    from minitune import MinituneError

    folder, prompts = toy_folder
    ppo = load_recipe("ppo")
    base = [f"model.path={folder}", f"data.source={prompts}", "data.template=text", "run.progress=false",
            "run.max_steps=1", "ppo.rollout_batch=4", "ppo.samples_per_prompt=4", "ppo.mini_batch=4", "gen.min_new_tokens=2",
            "gen.max_new_tokens=2", "init_adapter=", "held_out.prompts=0"]  # the rollout's scoring, not the held-out check's
    for fn, msg in [("helpers:reward_raises", "raised ValueError"), ("helpers:reward_nan", "non-finite"),
                    ("helpers:reward_wrong_shape", "returned 1 scores for 4 responses"),
                    ("helpers:no_such_fn", "cannot be imported")]:
        with pytest.raises(MinituneError, match=msg):
            ppo.train(parse_cli(ppo.PPOConfig, base + [f"reward.function={fn}", f"run.output_dir={tmp_path / fn}"]))


def test_group_settings_are_checked_before_loading(tmp_path):
    from minitune import MinituneError

    ppo = load_recipe("ppo")
    bad = [(["ppo.rollout_batch=10", "ppo.samples_per_prompt=4"], "multiple of ppo.samples_per_prompt"),
           (["ppo.samples_per_prompt=1", "ppo.group_baseline=true"], "samples_per_prompt to 2 or more"),
           (["ppo.rollout_batch=16", "ppo.samples_per_prompt=4", "ppo.mini_batch=6"], "mini_batch .6. must be a positive multiple"),
           (["ppo.samples_per_prompt=1", "ppo.group_baseline=false", "gen.greedy_member=true",
             "ppo.skip_equal_groups=false"], "but gen.greedy_member compare"),
           (["ppo.samples_per_prompt=1"], "but gen.greedy_member, ppo.group_baseline, ppo.skip_equal_groups compare a "
            "prompt's answers: set ppo.samples_per_prompt to 2 or more, or gen.greedy_member=false "
            "ppo.group_baseline=false ppo.skip_equal_groups=false"),
           (["ppo.init_kl_coef=0.1", "ppo.kl_coef_min=0.2"], "kl_coef_min .0.2. must lie in"),
           (["ppo.skip_equal_groups=true", "ppo.samples_per_prompt=4", "ppo.group_baseline=true",
             "ppo.use_value=true"], "skip_equal_groups drops prompts")]
    for args, msg in bad:
        with pytest.raises(MinituneError, match=msg):  # model.path does not exist: the check comes first
            ppo.train(parse_cli(ppo.PPOConfig, args + [f"model.path={tmp_path / 'none'}",
                                                       f"run.output_dir={tmp_path / 'o'}"]))


def test_default_rollout_budget_fits_every_synthetic_answer(demo_tok):
    # A correct answer cut off by the length budget is scored wrong, and PPO then teaches the policy
    # away from it (the first default drew 12-20 tokens while sort/reverse answers need up to 23).
    from minitune.data.synthetic import train_eval_split

    cfg = parse_cli(load_recipe("ppo").PPOConfig, [])
    train, evals = train_eval_split(cfg.data.synthetic_train, cfg.data.synthetic_eval, seed=cfg.run.seed)
    longest = max(len(demo_tok.encode(ex["answer"])) + 1 for ex in train + evals)  # + EOS
    assert cfg.gen.min_new_tokens >= longest, (cfg.gen.min_new_tokens, longest)
    assert cfg.held_out.max_new_tokens >= longest
    yaml_file = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "ppo_synthetic.yaml"
    yaml_cfg = parse_cli(load_recipe("ppo").PPOConfig, ["--config", str(yaml_file)])
    assert yaml_cfg.gen.min_new_tokens >= longest


def test_greedy_member_gives_ppo_the_greedy_answer_first(toy_folder, tmp_path, monkeypatch):
    """gen.greedy_member in PPO: each prompt's first answer is the greedy decode of the starting policy
    (a fresh adapter = the base), the others the samples drawn without the option, and the step trains on
    them (its trajectory's sequences hold the greedy answer)."""
    import random

    from minitune import load_model
    from minitune.rollout import sample_rollout
    from minitune.tokenizer import load_tokenizer
    from minitune.train.sections import GenSection

    folder, prompts = toy_folder
    ppo = load_recipe("ppo")
    seen = []
    real = ppo.make_trajectory
    monkeypatch.setattr(ppo, "make_trajectory", lambda cfg, ro, *a, **kw: seen.append(ro) or real(cfg, ro, *a, **kw))
    args = [f"model.path={folder}", f"data.source={prompts}", "data.template=text", "run.progress=false",
            "run.max_steps=1", "ppo.rollout_batch=8", "ppo.mini_batch=8", "ppo.samples_per_prompt=4",
            "ppo.group_baseline=true", "ppo.use_value=false", "gen.min_new_tokens=6", "gen.max_new_tokens=6",
            "init_adapter=", "held_out.prompts=0", "reward.function=helpers:share_of_letter_a"]
    ppo.train(parse_cli(ppo.PPOConfig, args + ["gen.greedy_member=true", f"run.output_dir={tmp_path / 'g'}"]))
    ppo.train(parse_cli(ppo.PPOConfig, args + ["gen.greedy_member=false", f"run.output_dir={tmp_path / 's'}"]))
    with_greedy, plain = seen
    k = 4
    model, tok = load_model(folder).eval(), load_tokenizer(folder)
    firsts = with_greedy.prompts[::k]
    greedy = sample_rollout(model, tok, firsts, [None] * len(firsts), gen=GenSection(min_new_tokens=6, max_new_tokens=6,
                            temperature=0.0), k=1, rng=random.Random(0), chat=False, system=None, device=None)
    assert with_greedy.responses[::k] == greedy.responses
    assert with_greedy.prompts == plain.prompts
    others = [b for b in range(len(plain.responses)) if b % k]
    assert [with_greedy.responses[b] for b in others] == [plain.responses[b] for b in others]
    assert plain.responses[::k] != greedy.responses  # without the option the first answers are samples


def test_missing_eos_and_empty_answer_penalties():
    """reward.missing_eos_penalty hits answers the budget cut off; reward.empty_penalty answers with nothing
    but whitespace (a reward model can rate silence highly); PPO subtracts both after the group baseline."""
    from minitune.generate import GenerationOutput
    from minitune.ppo import RunningMoments
    from minitune.rollout import Rollout, answer_penalties, empty_answers
    from helpers import share_of_letter_a

    ppo = load_recipe("ppo")
    responses = ["a a", "", "  \n", "bab"]  # helpers.share_of_letter_a scores the share of 'a'
    ended = torch.tensor([True, True, True, False])
    z = torch.zeros(4, 3)
    ro = Rollout(["p"] * 4, [None] * 4, z.long(), z.long(), GenerationOutput(z.long(), z.long(), z, z.long(),
                 torch.tensor([3, 1, 1, 3]), ended), responses, 0, 0.0, torch.zeros(4, dtype=torch.bool))
    assert empty_answers(responses).tolist() == [False, True, True, False]

    def scores(**kw):
        args = ["ppo.samples_per_prompt=4", "ppo.group_baseline=true", "ppo.mini_batch=4"]
        cfg = parse_cli(ppo.PPOConfig, args + [f"reward.{k}={v}" for k, v in kw.items()])
        return ppo.scores_for(cfg, ro, None, None, share_of_letter_a, RunningMoments(), None)[0]

    plain = scores()
    assert torch.allclose(scores(missing_eos_penalty=0.5) - plain, torch.tensor([0.0, 0.0, 0.0, -0.5]))
    assert torch.allclose(scores(empty_penalty=2.0) - plain, torch.tensor([0.0, -2.0, -2.0, 0.0]))
    both = parse_cli(ppo.PPOConfig, ["reward.missing_eos_penalty=0.5", "reward.empty_penalty=2.0"]).reward
    assert answer_penalties(ro, both).tolist() == [0.0, 2.0, 2.0, 0.5]
    with pytest.raises(MinituneError, match="is now 'reward.empty_penalty'"):  # the key's old place
        parse_cli(ppo.PPOConfig, ["ppo.empty_penalty=1.0"])
    with pytest.raises(MinituneError, match="empty_penalty"):
        parse_cli(ppo.PPOConfig, ["reward.empty_penalty=-1"])
