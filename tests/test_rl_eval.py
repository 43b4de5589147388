"""The RL recipes' prompt split, stop strings and held-out evaluation (minitune.rl_eval)."""
import json
import shutil

import pytest
import torch

from minitune.generate import GenerationOutput
from minitune.rollout import cut_at_stop_strings, load_prompts, stop_cut
from minitune.train.config import parse_cli
from minitune.train.sections import DataSection
from conftest import HH_PATH
from helpers import load_recipe, share_of_letter_a


def test_stop_strings_cut_answers_before_the_stop(demo_tok):
    tok = demo_tok
    texts = [" Yes, I do.\n\nHuman: Can you tell me more?", " No stop in this one at all", "\n\nSure, here it is.",
             " Short."]
    rows = [tok.encode(t) for t in texts]
    rows[3] = rows[3] + [tok.eos_ids[0]]  # ended by EOS before any stop string
    N, P = max(map(len, rows)) + 2, 3
    pad = tok.pad_id
    tokens = torch.full((len(rows), N), pad)
    mask = torch.zeros(len(rows), N, dtype=torch.long)
    for b, r in enumerate(rows):
        tokens[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
    lengths = mask.sum(1)
    seq = torch.cat([torch.full((len(rows), P), 7), tokens], 1)
    out = GenerationOutput(seq, tokens, torch.randn(len(rows), N) * mask, mask, lengths,
                           torch.tensor([False, False, False, True]))

    cut, stopped = cut_at_stop_strings(out, tok, ["\n\n"], P, pad)
    assert stopped.tolist() == [True, False, False, False]  # the leading blank line of row 2 is not a stop
    keep = int(cut.lengths[0])
    assert tok.decode(cut.tokens[0, :keep].tolist()) == " Yes, I do."
    assert cut.mask[0].sum() == keep and cut.mask[0, keep:].eq(0).all() and cut.tokens[0, keep:].eq(pad).all()
    assert cut.sequences[0, P + keep:].eq(pad).all() and torch.equal(cut.sequences[0, :P + keep], seq[0, :P + keep])
    assert cut.logprobs[0, keep:].eq(0).all() and torch.equal(cut.logprobs[0, :keep], out.logprobs[0, :keep])
    assert cut.ended.tolist() == [True, False, False, True]
    for b in (1, 2, 3):  # untouched
        assert torch.equal(cut.tokens[b], out.tokens[b]) and cut.lengths[b] == out.lengths[b]
    assert out.ended.tolist() == [False, False, False, True]  # the input is not modified
    # several stop strings: the earliest wins; none given: nothing changes
    assert tok.decode(rows[0][: stop_cut(tok, rows[0], ["Human:", ","])]) == " Yes"
    same, none = cut_at_stop_strings(out, tok, [], P, pad)
    assert same is out and not none.any()


def test_stop_cut_finds_the_same_prefix_as_a_token_by_token_scan(demo_tok):
    """stop_cut binary-searches the kept prefix; a scan that decodes one more token at a time is the
    reference, on random texts with stop strings anywhere (also inside multi-byte characters' runs)."""
    import random

    tok, rng = demo_tok, random.Random(0)
    words = ["Sure", ",", " here", "\n", "\n\n", "Human:", " naïve", " 日本語", " 42", "!", " ok", "Assistant:", " "]

    def scan(tokens, stops):
        text = tok.decode(tokens)
        lead = len(text) - len(text.lstrip())
        hits = [i for i in (text.find(s, lead) for s in stops) if i >= 0]
        if not hits:
            return None
        keep = 0
        while keep < len(tokens) and len(tok.decode(tokens[: keep + 1])) <= min(hits):
            keep += 1
        return max(keep, 1)

    checked = 0
    for _ in range(200):
        tokens = tok.encode("".join(rng.choice(words) for _ in range(rng.randint(1, 30))))
        stops = rng.sample(["\n\n", "Human:", "!", "日本"], rng.randint(1, 2))
        want = scan(tokens, stops)
        assert stop_cut(tok, tokens, stops) == want
        checked += want is not None
    assert checked > 100


def test_rl_prompts_hold_out_the_reward_models_held_out_pairs(demo_tok):
    if not HH_PATH.exists():
        pytest.skip(f"{HH_PATH} not found")
    from minitune.data.preference import load_preference_pairs

    d = DataSection(source=str(HH_PATH), hh_format=True, holdout=300)
    split = load_prompts(d, 0, demo_tok)
    _, held_pairs, _ = load_preference_pairs(d, demo_tok, 0)
    assert len(split.held_out) == 300 and len(split.prompts) == 2312 - 300
    assert split.held_out == [p.prompt for p in held_pairs]  # the pairs the reward model never trains on
    assert all(p.endswith("\n\nAssistant:") for p in split.prompts + split.held_out)
    assert split.held_out_references == [None] * 300
    other = load_prompts(DataSection(source=str(HH_PATH), hh_format=True, holdout=300), 1, demo_tok)
    assert other.held_out != split.held_out  # the seed picks the split


@pytest.mark.parametrize("recipe", ["ppo", "grpo"])
def test_held_out_reward_evaluation_scores_greedy_answers(toy_folder, tmp_path, recipe):
    folder, prompts = toy_folder
    mod = load_recipe(recipe)
    cls = {"ppo": "PPOConfig", "grpo": "GRPOConfig"}[recipe]
    section = {"ppo": ["ppo.rollout_batch=8", "ppo.mini_batch=4", "ppo.samples_per_prompt=4"],
               "grpo": ["grpo.rollout_batch=8", "grpo.group_size=4"]}[recipe]
    args = section + [f"model.path={folder}", f"data.source={prompts}", "data.template=text", "run.progress=false",
                      "run.save_every=0", "gen.min_new_tokens=6", "gen.max_new_tokens=6", "init_adapter=",
                      "reward.function=helpers:share_of_letter_a", "optim.lr=1e-2", "run.max_steps=2",
                      "run.eval_every=1", "data.holdout=6", "held_out.prompts=5", "held_out.max_new_tokens=6",
                      "held_out.kl_prompts=3"]
    out = mod.train(parse_cli(getattr(mod, cls), args + [f"run.output_dir={tmp_path / 'o'}"]))
    assert sorted(out["eval"]) == ["0", "1", "2"]
    for step, report in out["eval"].items():
        rows = [json.loads(line) for line in (tmp_path / "o" / "eval_samples" / f"step_{step}.jsonl").open()]
        assert len(rows) == 5  # held_out.prompts of the 6 held out
        scores = torch.tensor(share_of_letter_a([r["response"] for r in rows], None), dtype=torch.float64)
        assert [r["score"] for r in rows] == pytest.approx(scores.tolist())
        assert report["score_mean"] == pytest.approx(scores.mean().item())
        assert report["score_std"] == pytest.approx(scores.std().item())
        assert report["no_eos_share"] == pytest.approx(sum(not r["ended"] for r in rows) / 5)
        assert report["empty_share"] == pytest.approx(sum(not r["response"].strip() for r in rows) / 5)
        assert all(r["tokens"] <= 6 for r in rows)
    assert out["eval"]["0"]["kl"] == pytest.approx(0, abs=1e-9)  # the fresh policy is the reference
    assert out["eval"]["2"]["kl"] > 0 and out["eval"]["2"]["kl_length"] <= 6
    assert out["eval_before"] == out["eval"]["0"] and out["eval_after"] == out["eval"]["2"]
    if out["eval_before"]["score_std"] > 0:
        gain = (out["eval_after"]["score_mean"] - out["eval_before"]["score_mean"]) / out["eval_before"]["score_std"]
        assert out["eval_gain_sigma"] == pytest.approx(gain)
    logged = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").open()]
    assert sum("eval_score_mean" in r for r in logged) == 3
    # held_out.prompts=0: no evaluation at all
    off = mod.train(parse_cli(getattr(mod, cls), args + ["held_out.prompts=0", f"run.output_dir={tmp_path / 'off'}"]))
    assert "eval" not in off and not (tmp_path / "off" / "eval_samples").exists()


def test_synthetic_held_out_report_agrees_with_its_saved_answers(demo_model, demo_tok):
    from minitune.data.synthetic import is_correct, make_task
    from minitune.evaluation import exact_match_report

    examples = make_task(8)
    report, rows = exact_match_report(demo_model, demo_tok, examples, max_new_tokens=6)
    assert [r["prompt"] for r in rows] == [ex["prompt"] for ex in examples]
    assert all(r["correct"] == is_correct(r["answer"], r["reference"]) for r in rows)
    assert report["exact_match"] == sum(r["correct"] for r in rows) / 8
    for fam in ("add", "reverse", "sort", "convert"):
        mine = [r["correct"] for r in rows if r["family"] == fam]
        assert len(mine) == 2 and report[f"exact_match_{fam}"] == sum(mine) / 2


def test_headroom_report_counts_against_a_loop():
    """Per family and overall: greedy, pass@k, sample mean, fixable (greedy wrong, a sample right),
    stuck (no answer right) and signal (samples' rewards differ), each checked against a plain loop."""
    import random

    from minitune.data.synthetic import make_task, near_miss_answer, partial_credit_reward
    from minitune.evaluation import headroom_report

    rng = random.Random(0)
    examples = make_task(40)
    pick = lambda ex: ex["answer"] if rng.random() < 0.5 else near_miss_answer(ex, rng)  # noqa: E731
    greedy = [pick(ex) for ex in examples]
    samples = [[pick(ex) for _ in range(4)] for ex in examples]
    for reward in (None, partial_credit_reward):
        got = headroom_report(examples, greedy, samples, reward=reward)
        assert list(got) == ["add", "convert", "reverse", "sort", "all"]
        for fam, st in got.items():
            idx = [i for i, ex in enumerate(examples) if fam in ("all", ex["family"])]
            ok = lambda a, i: a == examples[i]["answer"]  # noqa: E731
            n = len(idx)
            assert st["prompts"] == n
            assert st["greedy"] == pytest.approx(sum(ok(greedy[i], i) for i in idx) / n)
            assert st["pass_at_k"] == pytest.approx(sum(any(ok(s, i) for s in samples[i]) for i in idx) / n)
            assert st["sample_mean"] == pytest.approx(sum(ok(s, i) for i in idx for s in samples[i]) / (4 * n))
            assert st["fixable"] == pytest.approx(
                sum(not ok(greedy[i], i) and any(ok(s, i) for s in samples[i]) for i in idx) / n)
            assert st["stuck"] == pytest.approx(
                sum(not ok(greedy[i], i) and not any(ok(s, i) for s in samples[i]) for i in idx) / n)
            score = (lambda i: [float(ok(s, i)) for s in samples[i]]) if reward is None else \
                (lambda i: reward(samples[i], [examples[i]["answer"]] * 4))
            assert st["signal"] == pytest.approx(sum(len(set(score(i))) > 1 for i in idx) / n)
    assert 0 < got["all"]["stuck"] < 1 and 0 < got["all"]["fixable"] < 1  # the cases occur
    with pytest.raises(ValueError, match="40 examples, 39 greedy"):
        headroom_report(examples, greedy[:-1], samples)


def _toy_policy(toy_folder):
    """The toy model with a fresh policy adapter (reference: the bare base) and its tokenizer."""
    from minitune import load_model
    from minitune.lora import LoRAConfig
    from minitune.tokenizer import load_tokenizer
    from minitune.train.setup import attach_policy

    folder, _ = toy_folder
    base = load_model(folder)
    reference = attach_policy(base, None, LoRAConfig(r=4, alpha=8))
    return base, reference, load_tokenizer(folder)


def _move_policy(base, scale=0.5):
    from minitune.lora import lora_parameters

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(base, "policy"):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_held_out_kl_is_zero_at_the_start_and_exact_for_one_token(toy_folder):
    """A fresh adapter is the reference: both KLs are 0. With one new token the sequence KL is the KL
    of the first next-token distributions, computed here from plain forwards of each prompt at T."""
    import torch.nn.functional as F

    from minitune.rl_eval import answer_kls, held_out_kl
    from minitune.train.sections import GenSection

    base, reference, tok = _toy_policy(toy_folder)
    prompts = ["add two", "the cat", "numbers please", "sat on"]
    gen = GenSection(min_new_tokens=1, max_new_tokens=1, temperature=0.8)
    start = held_out_kl(base, reference, tok, prompts, gen=gen, chat=False, system=None)
    assert start["kl"] == pytest.approx(0, abs=1e-9) and start["kl_sampled"] == pytest.approx(0, abs=1e-9)
    assert start["kl_length"] == 1
    _move_policy(base)
    full, sampled, length = answer_kls(base, reference, tok, prompts, gen=gen, chat=False, system=None)
    for i, p in enumerate(prompts):
        ids = torch.tensor([tok.encode(p)])
        lp = F.log_softmax(base(ids).logits[0, -1].double() / 0.8, -1)
        with reference():
            lq = F.log_softmax(base(ids).logits[0, -1].double() / 0.8, -1)
        assert full[i].item() == pytest.approx((lp.exp() * (lp - lq)).sum().item(), rel=1e-4)
    assert (full > 0.01).all() and length.eq(1).all()


def test_held_out_kl_agrees_with_the_sampled_log_ratio_on_average(toy_folder):
    """Both estimators have the sequence KL as their mean: over 400 sampled 4-token answers they agree
    within 4 standard errors, and the exact-per-position sum is the less noisy of the two."""
    from minitune.rl_eval import answer_kls
    from minitune.train.sections import GenSection

    base, reference, tok = _toy_policy(toy_folder)
    _move_policy(base, 0.3)
    prompts = ["add two", "the cat", "numbers please", "sat on"] * 100
    gen = GenSection(min_new_tokens=4, max_new_tokens=4, temperature=0.7)  # T matters: both estimators use it
    full, sampled, _ = answer_kls(base, reference, tok, prompts, gen=gen, chat=False, system=None, batch_size=100)
    se = (full.var() / len(full) + sampled.var() / len(sampled)).sqrt().item()
    assert abs(full.mean().item() - sampled.mean().item()) < 4 * se, (full.mean(), sampled.mean(), se)
    assert full.var() < sampled.var() and full.mean() > 0.05


def test_held_out_counts_prompts_gained_and_lost_since_step_0(tmp_path, monkeypatch, capsys):
    # exact match: each later evaluation logs how many prompts flipped each way since step 0, also after a
    # resume (from the step-0 answers on disk), and the closing line reports them
    import minitune.rl_eval as rl_eval
    from minitune.train.metrics import MetricsLogger
    from minitune.train.sections import WandbSection

    script = {0: [True, False, True, False], 5: [False, True, True, True], 10: [True, True, False, False]}
    state = {"step": 0}

    def fake_report(policy, tok, examples, **kw):
        rows = [{"prompt": ex["prompt"], "answer": "", "reference": ex["answer"], "family": ex["family"],
                 "correct": ok} for ex, ok in zip(examples, script[state["step"]])]
        return {"exact_match": sum(script[state["step"]]) / 4}, rows

    monkeypatch.setattr(rl_eval, "exact_match_report", fake_report)
    cfg = parse_cli(load_recipe("grpo").GRPOConfig, ["held_out.prompts=4"])
    log = MetricsLogger(tmp_path, WandbSection(), {})

    def evaluator():
        return rl_eval.HeldOutEval(None, None, None, cfg, reward_head=None, reward_fn=None, out_dir=tmp_path, log=log,
                                   is_main=True, device="cpu")

    ev = evaluator()
    for step in (0, 5):
        state["step"] = step
        report = ev(step)
    assert "gained" not in ev.reports[0]
    assert (report["gained"], report["lost"]) == (2, 1)  # F->T twice, T->F once
    assert rl_eval.flips(script[0], script[5]) == {"gained": 2.0, "lost": 1.0}
    assert "2 prompts gained, 1 lost since step 0" in capsys.readouterr().out
    resumed = evaluator()  # a resumed run has no step-0 report in memory: it reads step_0.jsonl
    state["step"] = 10
    assert (resumed(10)["gained"], resumed.reports[10]["lost"]) == (1, 1)
    ev.reports[10] = resumed.reports[10]
    assert ev.describe() == "held-out exact match 0.500 -> 0.500 (1 prompts gained, 1 lost)"
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [(r["step"], r.get("eval_gained"), r.get("eval_lost")) for r in logged] == [(0, None, None), (5, 2, 1),
                                                                                      (10, 1, 1)]


def test_evaluate_recipe_reproduces_the_training_runs_held_out_checks(toy_folder, tmp_path, monkeypatch):
    # recipes/evaluate.py on the base ("none") and on a GRPO run's adapter gives exactly that run's step-0 and final
    # held-out reports, and compares the second with the first prompt by prompt
    folder, prompts = toy_folder
    data = [f"model.path={folder}", f"data.source={prompts}", "data.template=text", "run.progress=false",
            "reward.function=helpers:share_of_letter_a", "data.holdout=6", "held_out.prompts=5",
            "held_out.max_new_tokens=6", "gen.min_new_tokens=6", "gen.max_new_tokens=6"]
    grpo = load_recipe("grpo")
    run = grpo.train(parse_cli(grpo.GRPOConfig, data + [
        "grpo.rollout_batch=8", "grpo.group_size=4", "run.save_every=0", "init_adapter=", "optim.lr=1e-2",
        "run.max_steps=2", "run.eval_every=0", f"run.output_dir={tmp_path / 'grpo'}"]))
    ev = load_recipe("evaluate")
    out = ev.evaluate(parse_cli(ev.EvalConfig, data + [f"adapters=none,{tmp_path / 'grpo' / 'adapter'}",
                                                       f"run.output_dir={tmp_path / 'ev'}"]))
    base, trained = "0_base", "1_grpo"
    assert list(out["reports"]) == [base, trained]
    assert out["reports"][base] == pytest.approx(run["eval_before"])
    assert out["reports"][trained] == pytest.approx(run["eval_after"])
    assert out["reports"][trained] != out["reports"][base]  # the run moved its answers
    rows = {n: [json.loads(x) for x in (tmp_path / "ev" / n / "eval_samples" / "step_0.jsonl").open()] for n in out["reports"]}
    assert [r["response"] for r in rows[trained]] == \
        [json.loads(x)["response"] for x in (tmp_path / "grpo" / "eval_samples" / "step_2.jsonl").open()]
    c = out["comparisons"][trained]
    assert c["improved"] == sum(b["score"] > a["score"] for a, b in zip(rows[base], rows[trained]))
    assert c["worsened"] == sum(b["score"] < a["score"] for a, b in zip(rows[base], rows[trained]))
    assert c["score_change"] == pytest.approx(run["eval_after"]["score_mean"] - run["eval_before"]["score_mean"])
    logged = [json.loads(x) for x in (tmp_path / "ev" / "metrics.jsonl").open()]
    assert [r["adapter"] for r in logged] == [base, trained]
    # --like the run's folder: its prompts and scoring, its start (none) and its adapter, without restating them
    cfg = ev.parse(["--like", str(tmp_path / "grpo"), f"run.output_dir={tmp_path / 'like'}"])
    assert cfg.adapters == ["none", str(tmp_path / "grpo" / "adapter")] and cfg.data.holdout == 6
    assert ev.evaluate(cfg)["reports"] == out["reports"]
    odd = shutil.copytree(tmp_path / "grpo" / "adapter", tmp_path / "lr1.5e-4 run")  # a folder name no module takes
    named = ev.evaluate(parse_cli(ev.EvalConfig, data + [f"adapters={odd}", f"run.output_dir={tmp_path / 'odd'}"]))
    assert named["reports"] == {"0_lr1_5e_4_run": out["reports"][trained]}
    assert ev.parse(["--like", str(tmp_path / "grpo"), "adapters=none", "held_out.prompts=2"]).adapters == ["none"]
    with pytest.raises(Exception, match="neither a run folder with a config.yaml nor a config file"):
        ev.parse(["--like", str(tmp_path / "nowhere")])
    assert ev.main(["--like"]) == 2 and ev.main(["adapters=", f"run.output_dir={tmp_path / 'x'}"]) == 2
    # bad input, before any model loads
    monkeypatch.chdir(tmp_path)  # no SFT default here: "auto" is the base, as in the RL recipes
    auto = ev.evaluate(parse_cli(ev.EvalConfig, data + ["adapters=auto", f"run.output_dir={tmp_path / 'auto'}"]))
    assert auto["reports"] == {base: out["reports"][base]}
    with pytest.raises(Exception, match="no adapter_config.json"):
        ev.evaluate(parse_cli(ev.EvalConfig, data + [f"adapters={tmp_path}", f"run.output_dir={tmp_path / 'x'}"]))
    assert not (tmp_path / "x").exists()
