"""GRPO: advantages and the KL estimator against loop references and formulas, the clipped loss
and its gradient by hand, aggregation across micro-batches, and the recipe on a toy reward
(the score rises; an lr=0 control fails the same assertion)."""
import json
import math

import pytest
import torch

from minitune import MinituneError
from minitune.grpo import (Aggregation, aggregate, clipped_surrogate, group_advantages, grpo_loss, informative_groups,
                           rows_to_guide,
                           k3_kl)
from minitune.train.config import parse_cli
from helpers import load_recipe

grpo_recipe = load_recipe("grpo")


def advantages_reference(scores, group, scale, eps=1e-4):
    out = []
    for g in range(0, len(scores), group):
        xs = scores[g: g + group]
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
        out += [(x - mean) / (std + eps) if scale else x - mean for x in xs]
    return out


def test_group_advantages_match_loop_reference_and_equal_groups_give_zero():
    torch.manual_seed(0)
    scores = torch.cat([torch.randn(8, dtype=torch.float64), torch.full((4,), 0.7, dtype=torch.float64),
                        torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)])
    for scale in (True, False):
        adv = group_advantages(scores, 4, scale=scale)
        ref = advantages_reference(scores.tolist(), 4, scale)
        assert torch.allclose(adv.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-6)
        assert adv[8:12].abs().max() == 0  # identical scores: no signal
    # one right answer among four wrong-scored ones: (1 - 0.25) / std(unbiased) = 0.75 / 0.5
    assert group_advantages(scores, 4)[12].item() == pytest.approx(0.75 / (0.5 + 1e-4), rel=1e-6)
    assert informative_groups(scores, 4).tolist() == [True, True, False, True]
    # negative_weight: below-mean answers scaled (0: only better-than-mean answers reinforced)
    for w in (0.0, 0.5):
        for scale in (True, False):
            ref = [a * w if a < 0 else a for a in advantages_reference(scores.tolist(), 4, scale)]
            adv = group_advantages(scores, 4, scale=scale, negative_weight=w)
            assert torch.allclose(adv.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-6)
    assert (group_advantages(scores, 4, negative_weight=0.0) >= 0).all()
    with pytest.raises(MinituneError, match="groups of 3"):
        group_advantages(scores, 3)
    with pytest.raises(MinituneError, match="group size >= 2"):
        group_advantages(scores, 1)


def test_k3_kl_is_its_formula_nonnegative_and_unbiased():
    logp = torch.tensor([-1.0, -2.0, -0.1], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.1], dtype=torch.float64)
    r = ref - logp
    assert torch.equal(k3_kl(logp, ref), torch.exp(r) - r - 1)
    assert k3_kl(logp, ref)[2] == 0 and (k3_kl(logp, ref) >= 0).all()
    # E_{x ~ p}[k3] = KL(p || q) for tokens sampled from the policy p
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    x = torch.multinomial(p, 400_000, replacement=True, generator=g)
    estimate = k3_kl(p.log()[x], q.log()[x]).mean()
    exact = (p * (p.log() - q.log())).sum()
    assert estimate.item() == pytest.approx(exact.item(), rel=0.02)


def test_clipped_surrogate_and_its_gradient_by_hand():
    # tokens: ratio inside the range, above 1 + clip_high with A > 0, below 1 - clip_low with A < 0,
    # above 1 + clip_high with A < 0 (not clipped: the pessimistic bound keeps the gradient)
    ratios = torch.tensor([1.1, 1.5, 0.5, 1.5], dtype=torch.float64)
    adv = torch.tensor([2.0, 2.0, -1.0, -1.0], dtype=torch.float64)
    old = torch.full((4, 1), -1.0, dtype=torch.float64)
    logp = (old[:, 0] + ratios.log())[:, None].clone().requires_grad_(True)
    loss, low, high = clipped_surrogate(logp, old, adv, clip_low=0.2, clip_high=0.28)
    expected = [-1.1 * 2.0, -1.28 * 2.0, 0.8 * 1.0, 1.5 * 1.0]
    assert loss[:, 0].tolist() == pytest.approx(expected, abs=1e-12)
    assert low[:, 0].tolist() == [False, False, True, False] and high[:, 0].tolist() == [False, True, False, False]
    loss.sum().backward()
    # d/dlogp of -ratio * A = -ratio * A where unclipped, 0 where clipped
    assert logp.grad[:, 0].tolist() == pytest.approx([-1.1 * 2.0, 0.0, 0.0, 1.5 * 1.0], abs=1e-12)


def test_loss_at_ratio_one_token_and_sequence_means_and_micro_batches_add_up():
    torch.manual_seed(0)
    B, R = 6, 5
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])
    mask = (torch.arange(R)[None] < lengths[:, None]).double()
    logp = torch.randn(B, R, dtype=torch.float64).requires_grad_(True)
    adv = torch.randn(B, dtype=torch.float64)
    loss, stats = grpo_loss(logp, logp.detach(), adv, mask, aggregation=Aggregation.TOKEN)
    # at ratio 1 the loss is -A averaged over response tokens, and its gradient -A / n_tokens per token
    n = mask.sum()
    assert loss.item() == pytest.approx(-(adv[:, None] * mask).sum().item() / n.item(), abs=1e-12)
    loss.backward()
    assert torch.allclose(logp.grad, -adv[:, None] * mask / n)
    assert stats.ratio.item() == pytest.approx(1.0) and stats.clip_low == 0 and stats.clip_high == 0
    seq_loss, _ = grpo_loss(logp, logp.detach(), adv, mask, aggregation=Aggregation.SEQUENCE)
    assert seq_loss.item() == pytest.approx(-adv.mean().item(), abs=1e-12)  # every answer weighs the same
    # micro-batches given the whole minibatch's counts sum to the whole minibatch's loss
    per_token = torch.randn(B, R, dtype=torch.float64)
    for how in Aggregation:
        whole = aggregate(per_token, mask, how)
        parts = sum(aggregate(per_token[s: s + 2], mask[s: s + 2], how, total_tokens=n.item(), total_sequences=B)
                    for s in range(0, B, 2))
        assert parts.item() == pytest.approx(whole.item(), abs=1e-12)


def test_kl_term_adds_beta_times_k3():
    torch.manual_seed(1)
    logp, ref = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    mask, adv = torch.ones(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    loss, stats = grpo_loss(logp, logp, adv, mask, beta=0.04, ref_logp=ref)
    assert loss.item() == pytest.approx(0.04 * k3_kl(logp, ref).mean().item(), abs=1e-12)
    assert stats.kl.item() == pytest.approx(k3_kl(logp, ref).mean().item(), abs=1e-12)
    with pytest.raises(MinituneError, match="needs the reference log-probs"):
        grpo_loss(logp, logp, adv, mask, beta=0.04)


def toy_args(toy_folder, out, **extra):
    folder, prompts = toy_folder
    args = {"model.path": folder, "data.source": prompts, "data.template": "text", "run.progress": "false",
            "run.save_every": 0, "grpo.rollout_batch": 32, "grpo.group_size": 4, "gen.min_new_tokens": 8,
            "gen.max_new_tokens": 8, "init_adapter": "", "reward.function": "helpers:share_of_letter_a", "lora.r": 8,
            "optim.lr": 1e-2, "run.max_steps": 30, "run.output_dir": out,
            # as measured below (the embedded default since moved to Dr. GRPO with a KL term and the greedy member)
            "grpo.beta": 0.0, "grpo.scale_advantages": "true", "grpo.micro_batch": 16, "gen.greedy_member": "false"}
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def run(args):
    return grpo_recipe.train(parse_cli(grpo_recipe.GRPOConfig, args))


# Last-5 minus first-5 mean toy score in 30 steps (32 answers, groups of 4, lr 1e-2), measured on this
# project's CPU for seeds 0/1/2: +0.254 / +0.150 / +0.366, mean +0.257 (lr 3e-2: mean +0.333); lr=0
# gives -0.008. The test asks for under half the mean.
TOY_SEEDS = (0, 1, 2)
MIN_TOY_EFFECT = 0.12


def toy_effect(toy_folder, out, lr: float) -> tuple[float, list[dict]]:
    effects, runs = [], []
    for seed in TOY_SEEDS:
        runs.append(run(toy_args(toy_folder, out / f"{lr}_{seed}", **{"optim.lr": lr, "run.seed": seed})))
        scores = [h["score_mean"] for h in runs[-1]["history"]]
        effects.append(sum(scores[-5:]) / 5 - sum(scores[:5]) / 5)
    return sum(effects) / len(effects), runs


@pytest.mark.slow
def test_grpo_raises_a_toy_reward_and_the_lr0_control_does_not(toy_folder, tmp_path):
    effect, runs = toy_effect(toy_folder, tmp_path, 1e-2)
    assert effect > MIN_TOY_EFFECT, effect
    control, control_runs = toy_effect(toy_folder, tmp_path, 0.0)
    assert not control > MIN_TOY_EFFECT, control
    for out in runs + control_runs:
        h = out["history"]
        assert all(0 <= s["informative_groups"] <= 1 for s in h)
        assert all(s["ratio"] == pytest.approx(1.0) for s in h if s["updated"])  # one update per rollout: on-policy


@pytest.mark.slow
def test_kl_clipping_several_updates_per_rollout_and_exact_resume(toy_folder, tmp_path):
    from minitune.train.metrics import read_metrics

    extra = {"grpo.beta": 0.1, "grpo.mini_batches": 2, "grpo.epochs": 2, "grpo.micro_batch": 8,
             "grpo.scale_advantages": "false", "grpo.aggregation": "sequence", "run.max_steps": 4, "run.save_every": 2,
             "run.keep_last": 3}
    full = run(toy_args(toy_folder, tmp_path / "a", **extra))
    h = [s for s in full["history"] if s["updated"]]
    assert h and all(s["kl"] >= 0 for s in h)
    assert any(s["kl"] > 0 for s in h[1:])  # the policy left the reference
    assert any(abs(s["ratio"] - 1) > 1e-6 for s in h)  # later updates are off-policy: ratios move
    run(toy_args(toy_folder, tmp_path / "b", **extra, **{"run.resume": tmp_path / "a" / "checkpoints" / "step_00000002"}))
    a = [r["score_mean"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "score_mean" in r]
    b = [r["score_mean"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "score_mean" in r]
    la = [r.get("loss") for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "score_mean" in r]
    lb = [r.get("loss") for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "score_mean" in r]
    assert len(a) == 4 and b == pytest.approx(a[2:], abs=1e-6) and lb == pytest.approx(la[2:], abs=1e-6)


def test_equal_groups_are_skipped_before_the_update(toy_folder, tmp_path, monkeypatch):
    seen = []
    real = grpo_recipe.update
    monkeypatch.setattr(grpo_recipe, "update", lambda model, ro, adv, rows, *a, **k: seen.append(rows) or real(
        model, ro, adv, rows, *a, **k))
    out = run(toy_args(toy_folder, tmp_path / "o", **{"reward.function": "helpers:constant_reward", "run.max_steps": 2}))
    assert seen == [] and all(s["informative_groups"] == 0 and not s["updated"] for s in out["history"])
    assert (tmp_path / "o" / "adapter" / "adapter_model.safetensors").exists()


def test_answer_penalties_enter_the_group_advantages(toy_folder, tmp_path, monkeypatch):
    """reward.missing_eos_penalty / reward.empty_penalty come off the scores before the group advantages:
    with a constant reward, every group's only signal is its penalized answers, pushed down."""
    seen, given, real, real_penalties = [], [], grpo_recipe.update, grpo_recipe.answer_penalties

    def penalties(ro, reward):  # the real function (0.5 off each answer the 8-token budget cut), then 0.5 more
        assert reward.missing_eos_penalty == 0.5  # off one answer per group
        one_per_group = torch.tensor([reward.missing_eos_penalty, 0, 0, 0]).repeat(len(ro.responses) // 4)
        given.append(real_penalties(ro, reward) + one_per_group)
        return given[-1]
    monkeypatch.setattr(grpo_recipe, "answer_penalties", penalties)
    monkeypatch.setattr(grpo_recipe, "update", lambda model, ro, adv, rows, *a, **k: seen.append(adv.clone()) or real(
        model, ro, adv, rows, *a, **k))
    out = run(toy_args(toy_folder, tmp_path / "o", **{"reward.function": "helpers:constant_reward", "run.max_steps": 1,
                                                      "reward.missing_eos_penalty": 0.5,
                                                      "grpo.scale_advantages": "false"}))
    assert out["history"][0]["informative_groups"] == 1 and out["history"][0]["score_mean"] == 0.5  # raw scores logged
    p = given[0].view(8, 4)
    expected = -(p - p.mean(1, keepdim=True)).flatten()  # constant reward: the penalties against the group's mean
    assert len(seen) == 1 and torch.allclose(seen[0].cpu(), expected)
    assert (expected.view(8, 4)[:, 0] <= 0).all() and expected.abs().sum() > 0  # the doubly penalized answer: down


def test_bad_settings_fail_before_the_model_loads(tmp_path):
    with pytest.raises(MinituneError, match=r"grpo.rollout_batch=30 must be a multiple of group_size \(8\)"):
        parse_cli(grpo_recipe.GRPOConfig, ["grpo.rollout_batch=30"])
    with pytest.raises(MinituneError, match=r"grpo.group_size=1 must be >= 2"):
        parse_cli(grpo_recipe.GRPOConfig, ["grpo.group_size=1"])
    with pytest.raises(MinituneError, match=r"grpo.beta=-0.1 must be >= 0"):
        parse_cli(grpo_recipe.GRPOConfig, ["grpo.beta=-0.1"])
    with pytest.raises(MinituneError, match=r"grpo.negative_weight=1.5 must be in \[0, 1\]"):
        parse_cli(grpo_recipe.GRPOConfig, ["grpo.negative_weight=1.5"])
    with pytest.raises(MinituneError, match=r"gen.min_new_tokens=40 must be in \[1, max_new_tokens=32\]"):
        parse_cli(grpo_recipe.GRPOConfig, ["gen.min_new_tokens=40"])
    adapter = tmp_path / "other"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                             "base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}))
    # model.path does not exist: the adapter's base and the reward function are checked first
    with pytest.raises(MinituneError, match="was trained on base 'meta-llama/Llama-2-7b-hf', but model.path is"):
        run([f"init_adapter={adapter}", f"model.path={tmp_path / 'none'}", f"run.output_dir={tmp_path / 'o'}"])
    with pytest.raises(MinituneError, match="reward.function 'helpers:nope' cannot be imported"):
        run(["init_adapter=", "reward.function=helpers:nope", f"model.path={tmp_path / 'none'}",
             f"run.output_dir={tmp_path / 'o'}"])


def test_rows_to_guide_picks_the_worst_answer_of_groups_below_their_reference():
    torch.manual_seed(0)
    for G in (2, 4, 8):
        scores = torch.randint(0, 3, (5 * G,)).double() / 2  # scores in {0, 0.5, 1}: ties happen
        refs = torch.tensor([1.0, 0.5, 1.0, 0.0, 1.0], dtype=torch.float64)
        want = []
        for i in range(5):  # loop reference
            group = scores[i * G:(i + 1) * G].tolist()
            if all(s < refs[i] for s in group):
                want.append(i * G + group.index(min(group)))
        assert rows_to_guide(scores, refs, G) == want
    assert rows_to_guide(torch.tensor([1.0, 0, 0, 0]), torch.tensor([1.0, 1.0]), 2) == [2]  # first of equals
    assert rows_to_guide(torch.ones(4), torch.ones(2), 2) == []
    with pytest.raises(MinituneError, match="3 reference scores for 2 groups"):
        rows_to_guide(torch.ones(4), torch.ones(3), 2)


def test_guided_answers_are_the_reference_tokens_and_score_like_teacher_forcing(toy_folder):
    """with_answers: a replaced row holds the reference's tokens and an EOS (widening the rollout
    when it is longer than every sample), other rows are untouched, and the update forward's
    log-probs of the replaced row equal a plain forward over prompt + reference."""
    import random

    from minitune import load_model
    from minitune.ppo import logprobs_from_logits, policy_forward
    from minitune.rollout import sample_rollout, with_answers
    from minitune.tokenizer import load_tokenizer
    from minitune.train.sections import GenSection

    folder, _ = toy_folder
    model, tok = load_model(folder).eval(), load_tokenizer(folder)
    gen = GenSection(min_new_tokens=3, max_new_tokens=3, temperature=1.0, max_prompt_length=16)
    ro = sample_rollout(model, tok, ["add two", "the cat sat"], ["x", "y"], gen=gen, k=2, rng=random.Random(0),
                        chat=False, system=None, device=None)
    long = "the cat sat on a mat please"
    out = with_answers(ro, {1: long, 2: "cat"}, tok)
    P, N = ro.query.shape[1], ro.gen.tokens.shape[1]
    for b, text in ((1, long), (2, "cat")):
        ids = tok.encode(text, add_special_tokens=False) + [tok.eos_id]
        n = len(ids)
        assert out.gen.tokens[b, :n].tolist() == ids and out.gen.tokens[b, n:].eq(tok.pad_id).all()
        assert out.gen.mask[b].sum() == n and out.gen.lengths[b] == n and out.gen.ended[b]
        assert out.responses[b] == text and torch.equal(out.gen.sequences[b, :P], ro.gen.sequences[b, :P])
    assert out.gen.tokens.shape[1] == len(tok.encode(long, add_special_tokens=False)) + 1 > N  # widened
    for b in (0, 3):  # untouched
        assert torch.equal(out.gen.tokens[b, :N], ro.gen.tokens[b]) and out.gen.mask[b, N:].eq(0).all()
        assert out.responses[b] == ro.responses[b]
    assert with_answers(ro, {}, tok) is ro
    rows = torch.arange(4)
    logp = policy_forward(model, out.gen.sequences[rows], out.attention_mask[rows], out.gen.mask[rows], 2, 1.0,
                          values=False)[0]
    for b in (1, 2):
        n = int(out.gen.lengths[b])
        prompt = ro.query[b][ro.query_mask[b].bool()]
        ids = torch.cat([prompt, out.gen.tokens[b, :n]])[None]
        with torch.no_grad():
            want = logprobs_from_logits(model(ids)[0][:, len(prompt) - 1: -1], ids[:, len(prompt):])[0]
        torch.testing.assert_close(logp[b, :n], want, atol=1e-5, rtol=1e-5)


def test_greedy_member_puts_the_greedy_answer_first_in_every_group(toy_folder, tmp_path, monkeypatch):
    """gen.greedy_member: each group's first answer is what greedy decoding gives (the fresh policy
    adapter starts as the base), the other answers are the samples the run draws without the option."""
    import random

    from minitune import load_model
    from minitune.rollout import sample_rollout
    from minitune.tokenizer import load_tokenizer
    from minitune.train.sections import GenSection

    seen = []
    real = grpo_recipe.update
    monkeypatch.setattr(grpo_recipe, "update", lambda model, ro, *a, **k: seen.append(ro) or real(model, ro, *a, **k))
    extra = {"run.max_steps": 1, "reward.function": "helpers:share_of_letter_a"}
    run(toy_args(toy_folder, tmp_path / "g", **extra, **{"gen.greedy_member": "true"}))
    run(toy_args(toy_folder, tmp_path / "s", **extra))
    with_greedy, plain = seen
    G = 4
    folder, _ = toy_folder
    model, tok = load_model(folder).eval(), load_tokenizer(folder)
    firsts = with_greedy.prompts[::G]
    greedy = sample_rollout(model, tok, firsts, [None] * len(firsts), gen=GenSection(min_new_tokens=8, max_new_tokens=8,
                            temperature=0.0), k=1, rng=random.Random(0), chat=False, system=None, device=None)
    assert [with_greedy.responses[i * G] for i in range(len(firsts))] == greedy.responses
    others = [b for b in range(len(plain.responses)) if b % G]
    assert [with_greedy.responses[b] for b in others] == [plain.responses[b] for b in others]
    assert [plain.responses[i * G] for i in range(len(firsts))] != greedy.responses  # without it: samples


def test_guidance_teaches_a_reference_the_policy_never_samples(toy_folder, tmp_path):
    """Every toy answer is wrong against the reference "cat" (exact match): plain GRPO sees groups of
    equal scores and never updates; with grpo.guide the reference goes into every group and the policy
    starts answering it. lr=0 is the control."""
    import json as _json

    folder, _ = toy_folder
    prompts = tmp_path / "ref.jsonl"
    prompts.write_text("\n".join(_json.dumps({"prompt": p, "reference": "cat"}) for p in ["add two", "sat on"] * 8))

    def guided(lr, guide="true"):
        return run(toy_args(toy_folder, tmp_path / f"{lr}_{guide}", **{
            "data.source": prompts, "reward.function": "minitune.data.synthetic:correctness_reward", "grpo.guide": guide,
            "grpo.rollout_batch": 16, "run.max_steps": 12, "optim.lr": lr}))["history"]

    plain = guided(1e-2, "false")
    assert all(not s["updated"] and s["score_mean"] == 0 for s in plain)  # no right sample: no signal
    h = guided(1e-2)
    assert h[0]["guided_groups"] == 1.0 and h[0]["score_mean"] == 0 and h[0]["updated"]
    # mean of the last 4 steps, measured on this CPU for seeds 0/1/2: 0.23 / 0.38 / 0.38; lr=0: 0.0
    assert sum(s["score_mean"] for s in h[-4:]) / 4 > 0.1, [s["score_mean"] for s in h]
    control = guided(0.0)
    assert not sum(s["score_mean"] for s in control[-4:]) / 4 > 0.1, [s["score_mean"] for s in control]
    with pytest.raises(MinituneError, match="grpo.guide puts a prompt's reference answer into its group"):
        run(toy_args(toy_folder, tmp_path / "none", **{"grpo.guide": "true", "run.max_steps": 1}))
    with pytest.raises(MinituneError, match="grpo.guide=True .*use reward.function, not reward.adapter"):
        run(toy_args(toy_folder, tmp_path / "adapter", **{"grpo.guide": "true", "reward.adapter": tmp_path}))


def test_demonstrations_are_each_prompts_reference_and_their_nll_is_teacher_forcing(toy_folder):
    """demonstrations: one row per group, its answer the prompt's reference and an EOS; the NLL the
    supervised term adds is the mean over those tokens of a plain forward's negative log-probs."""
    import random

    from minitune import load_model
    from minitune.ppo import logprobs_from_logits
    from minitune.rollout import demonstration_nll, demonstrations, sample_rollout
    from minitune.tokenizer import load_tokenizer
    from minitune.train.sections import GenSection

    folder, _ = toy_folder
    model, tok = load_model(folder).eval(), load_tokenizer(folder)
    gen = GenSection(min_new_tokens=3, max_new_tokens=3, temperature=1.0, max_prompt_length=16)
    refs = ["the cat sat on a mat please", "cat"]
    ro = sample_rollout(model, tok, ["add two", "the cat sat"], refs, gen=gen, k=3, rng=random.Random(0),
                        chat=False, system=None, device=None)
    demo = demonstrations(ro, 3, tok)
    assert demo.prompts == ["add two", "the cat sat"] and demo.responses == refs
    nll, n = 0.0, 0
    for i, text in enumerate(refs):
        ids = tok.encode(text, add_special_tokens=False) + [tok.eos_id]
        assert demo.gen.tokens[i, :len(ids)].tolist() == ids and demo.gen.mask[i].sum() == len(ids)
        assert torch.equal(demo.query[i], ro.query[3 * i])
        prompt = ro.query[3 * i][ro.query_mask[3 * i].bool()]
        full = torch.cat([prompt, torch.tensor(ids)])[None]
        with torch.no_grad():
            nll -= logprobs_from_logits(model(full)[0][:, len(prompt) - 1: -1], full[:, len(prompt):]).sum().item()
        n += len(ids)
    with torch.no_grad():
        got = demonstration_nll(model, demo).item()
    assert got == pytest.approx(nll / n, rel=1e-5)
    with pytest.raises(MinituneError, match="no reference answers"):
        demonstrations(ro._replace(references=[None] * 6), 3, tok)


def test_supervised_term_teaches_references_when_no_group_carries_signal(toy_folder, tmp_path):
    """grpo.sft_coef: every toy answer is wrong against the reference "cat", so no group carries
    signal and plain GRPO never updates (the guidance test above); the supervised term alone updates
    every step and the policy starts answering "cat". lr=0 is the control."""
    import json as _json

    folder, _ = toy_folder
    prompts = tmp_path / "ref.jsonl"
    prompts.write_text("\n".join(_json.dumps({"prompt": p, "reference": "cat"}) for p in ["add two", "sat on"] * 8))

    def supervised(lr):
        return run(toy_args(toy_folder, tmp_path / f"sft_{lr}", **{
            "data.source": prompts, "reward.function": "minitune.data.synthetic:correctness_reward",
            "grpo.sft_coef": 1.0, "grpo.rollout_batch": 16, "run.max_steps": 12, "optim.lr": lr}))["history"]

    h = supervised(1e-2)
    assert all(s["updated"] and s["informative_groups"] == 0 for s in h[:1])
    assert h[-1]["sft_nll"] < h[0]["sft_nll"] / 2, [s["sft_nll"] for s in h]
    assert sum(s["score_mean"] for s in h[-4:]) / 4 > 0.1, [s["score_mean"] for s in h]
    control = supervised(0.0)
    assert not control[-1]["sft_nll"] < control[0]["sft_nll"] / 2, [s["sft_nll"] for s in control]
    assert not sum(s["score_mean"] for s in control[-4:]) / 4 > 0.1, [s["score_mean"] for s in control]
    with pytest.raises(MinituneError, match="grpo.sft_coef learns the prompts' reference answers"):
        run(toy_args(toy_folder, tmp_path / "none", **{"grpo.sft_coef": 0.5, "run.max_steps": 1}))
    with pytest.raises(MinituneError, match="sft_coef"):
        parse_cli(grpo_recipe.GRPOConfig, ["grpo.sft_coef=-1"])


def test_synthetic_config_is_the_embedded_default():
    from pathlib import Path

    from minitune.train.config import to_dict

    yaml_file = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "grpo_synthetic.yaml"
    assert to_dict(parse_cli(grpo_recipe.GRPOConfig, ["--config", str(yaml_file)])) == \
        to_dict(parse_cli(grpo_recipe.GRPOConfig, []))
