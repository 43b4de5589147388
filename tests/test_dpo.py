"""DPO: the losses and their gradients against hand-computed float64 values, log 2 at the start,
prompt masking, and the recipe on a tiny model (accuracy rises; an lr=0 control does not)."""
import json
import math

import pytest
import torch

from minitune import MinituneError
from minitune.data.shared_prompt import layout_pairs, tokenize_shared_pair
from minitune.data.preference import PreferencePair
from minitune.dpo import DPOLossType, dpo_loss, response_logprobs
from minitune.train.config import parse_cli
from helpers import load_recipe, tiny_with_real_tokenizer

dpo_recipe = load_recipe("dpo")


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_losses_and_gradients_match_hand_computed_float64():
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64, requires_grad=True) for v in (-3.0, -5.5, -3.5, -5.0))
    beta, eps = 0.2, 0.1
    h = (-3.0 - -5.5) - (-3.5 - -5.0)  # 1.0
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    cases = {
        # loss, d loss / d policy_chosen (= -d/d policy_rejected)
        (DPOLossType.SIGMOID, 0.0): (-_log_sigmoid(beta * h), -beta * (1 - sig(beta * h))),
        (DPOLossType.SIGMOID, eps): (-(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h),
                                     -beta * ((1 - eps) * (1 - sig(beta * h)) - eps * sig(beta * h))),
        (DPOLossType.ROBUST, eps): ((-(1 - eps) * _log_sigmoid(beta * h) + eps * _log_sigmoid(-beta * h)) / (1 - 2 * eps),
                                    -beta * ((1 - eps) * (1 - sig(beta * h)) + eps * sig(beta * h)) / (1 - 2 * eps)),
        (DPOLossType.IPO, 0.0): ((h - 1 / (2 * beta)) ** 2, 2 * (h - 1 / (2 * beta))),
    }
    for (kind, smoothing), (loss, grad) in cases.items():
        for t in (pc, pr, rc, rr):
            t.grad = None
        out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=kind, label_smoothing=smoothing)
        out.losses.sum().backward()
        assert out.losses.item() == pytest.approx(loss, abs=1e-12), kind
        assert pc.grad.item() == pytest.approx(grad, abs=1e-12) and pr.grad.item() == pytest.approx(-grad, abs=1e-12)
        assert rc.grad.item() == pytest.approx(-grad, abs=1e-12) and rr.grad.item() == pytest.approx(grad, abs=1e-12)
        assert out.chosen_rewards.item() == pytest.approx(beta * 0.5) and out.rejected_rewards.item() == pytest.approx(-beta * 0.5)


def test_at_the_start_the_loss_is_log2_and_rewards_are_zero():
    lp = torch.randn(5, dtype=torch.float64)
    lr = torch.randn(5, dtype=torch.float64)
    out = dpo_loss(lp, lr, lp.clone(), lr.clone(), beta=0.1)
    assert torch.allclose(out.losses, torch.full((5,), math.log(2), dtype=torch.float64))
    assert out.chosen_rewards.abs().max() == 0 and out.rejected_rewards.abs().max() == 0


def test_only_response_tokens_are_scored(demo_tok):
    pair = PreferencePair("Question: what is two plus two?\nAnswer:", " four", " five")
    sp = tokenize_shared_pair(pair, demo_tok, 64)
    assert sp.prompt == demo_tok.encode(pair.prompt) and sp.chosen[-1] == sp.rejected[-1] == demo_tok.eos_id
    layout = layout_pairs([sp], demo_tok.pad_id)
    P = len(sp.prompt)
    # the response and its EOS, nothing of the prompt; both first tokens predicted by the prompt's last one
    assert layout.targets.tolist() == sp.chosen + sp.rejected
    assert layout.predictors.tolist() == [P - 1 + k for k in range(len(sp.chosen))] + \
        [P - 1] + [P + len(sp.chosen) + k for k in range(len(sp.rejected) - 1)]
    # the summed log-prob changes with the logit of a predicting position only
    V = demo_tok.vocab_size
    logits = torch.zeros(layout.targets.numel(), V, requires_grad=True)
    summed, count = response_logprobs(logits, layout)
    summed.sum().backward()
    assert count.tolist() == [len(sp.chosen), len(sp.rejected)]
    assert summed[0].item() == pytest.approx(-len(sp.chosen) * math.log(V), rel=1e-5)
    assert logits.grad.abs().sum(-1).gt(0).all()


@pytest.fixture(scope="module")
def tiny(demo_dir, tmp_path_factory):
    return tiny_with_real_tokenizer(tmp_path_factory.mktemp("tiny") / "m", demo_dir)


def base_args(tiny, out, **extra):
    args = {"model.path": str(tiny), "run.output_dir": str(out), "run.progress": "false", "run.max_steps": 8,
            "run.batch_size": 4, "run.save_every": 4, "run.keep_last": 5, "data.synthetic_train": 64,
            "data.synthetic_eval": 16, "data.seq_length": 64, "optim.lr": 1e-2, "optim.warmup_steps": 0,
            "lora.r": 4, "init_adapter": "", "eval_accuracy": "false", "dpo.beta": 0.5, "dpo.sft_weight": 0.0}
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def run(args):
    return dpo_recipe.train(parse_cli(dpo_recipe.DPOConfig, args))


# log 2 minus the mean DPO loss of the last 4 of 16 steps on 8 training pairs (batch 4, lr 1e-2,
# beta 0.5), measured on this project's CPU for seeds 0/1/2: 0.364 / 0.323 / 0.068, mean 0.251; lr=0
# gives exactly 0 (train accuracy 1.0 / 0.875 / 0.56 vs 0). The test asks for half the mean.
DPO_SEEDS = (0, 1, 2)
MIN_LOSS_DROP = 0.125


def mean_loss_drop(tiny, out, lr: float) -> float:
    from minitune.train.metrics import read_metrics

    drops = []
    for seed in DPO_SEEDS:
        run(base_args(tiny, out / f"{lr}_{seed}", **{"optim.lr": lr, "run.seed": seed, "run.save_every": 0,
                                                      "data.synthetic_train": 8, "run.max_steps": 16}))
        losses = [r["loss"] for r in read_metrics(out / f"{lr}_{seed}" / "metrics.jsonl") if "lr" in r]
        drops.append(math.log(2) - sum(losses[-4:]) / 4)
    return sum(drops) / len(drops)


@pytest.mark.slow
def test_recipe_learns_preferences_and_the_lr0_control_does_not(tiny, tmp_path):
    assert mean_loss_drop(tiny, tmp_path, 1e-2) > MIN_LOSS_DROP
    assert not mean_loss_drop(tiny, tmp_path, 0.0) > MIN_LOSS_DROP


@pytest.mark.slow
def test_recipe_starts_at_log2_and_resumes_exactly(tiny, tmp_path):
    from minitune.train.metrics import read_metrics

    first = run(base_args(tiny, tmp_path / "a"))
    assert first["before"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at the start
    assert first["before"]["eval_rewards_chosen"] == pytest.approx(0.0, abs=1e-6)
    assert set(first["after"]) == {"eval_loss", "eval_rewards_chosen", "eval_rewards_rejected", "eval_margin",
                                   "eval_accuracy", "eval_kl"}
    run(base_args(tiny, tmp_path / "b", **{"run.resume": tmp_path / "a" / "checkpoints" / "step_00000004"}))
    full = [r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "lr" in r]
    resumed = [r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "lr" in r]
    assert len(full) == 8 and resumed == pytest.approx(full[4:], abs=1e-6)


@pytest.mark.slow
def test_start_adapter_is_the_frozen_reference(tiny, tmp_path):
    # the policy starts as a copy of the adapter, the reference is that adapter frozen: loss log 2 at
    # the start, and the saved start adapter is untouched by training
    run(base_args(tiny, tmp_path / "first", **{"run.max_steps": 2}))
    start = tmp_path / "first" / "adapter"
    out = run(base_args(tiny, tmp_path / "second", **{"init_adapter": start, "run.max_steps": 2, "dpo.sft_weight": 1.0}))
    assert out["start_adapter"] == str(start)
    assert out["before"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert out["after"]["eval_loss"] != pytest.approx(math.log(2), abs=1e-5)


def test_bad_settings_fail_before_the_model_loads(tmp_path):
    with pytest.raises(MinituneError, match=r"dpo.beta=0.0 must be > 0"):
        parse_cli(dpo_recipe.DPOConfig, ["dpo.beta=0"])
    with pytest.raises(MinituneError, match=r"dpo.label_smoothing=0.5 must be in \[0, 0.5\)"):
        parse_cli(dpo_recipe.DPOConfig, ["dpo.label_smoothing=0.5"])
    with pytest.raises(MinituneError, match="dpo.loss: 'kto' is not one of"):
        parse_cli(dpo_recipe.DPOConfig, ["dpo.loss=kto"])
    adapter = tmp_path / "other"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                             "base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}))
    # model.path does not exist: the adapter's base is checked before anything is loaded
    with pytest.raises(MinituneError, match="was trained on base 'meta-llama/Llama-2-7b-hf', but model.path is"):
        run([f"init_adapter={adapter}", f"model.path={tmp_path / 'none'}", f"run.output_dir={tmp_path / 'o'}"])
    with pytest.raises(MinituneError, match="no adapter_config.json there"):
        run([f"init_adapter={tmp_path}", f"run.output_dir={tmp_path / 'o'}"])


def test_pairs_with_a_missing_or_identical_side_are_skipped_and_counted(tiny, tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "a"}, {"prompt": "p", "chosen": "", "rejected": "b"}] * 5
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(MinituneError, match=r"every training pair was skipped \(pairs: kept 0; skipped \d+ with a "
                                            r"missing side, \d+ with chosen == rejected"):
        run(base_args(tiny, tmp_path / "o", **{"data.source": data, "data.holdout": 2}))


def test_synthetic_config_is_the_embedded_default():
    from pathlib import Path

    from minitune.train.config import to_dict

    yaml_file = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "dpo_synthetic.yaml"
    assert to_dict(parse_cli(dpo_recipe.DPOConfig, ["--config", str(yaml_file)])) == \
        to_dict(parse_cli(dpo_recipe.DPOConfig, []))


def test_own_mistake_pairs_pair_the_reference_with_a_wrong_sampled_answer(tiny, demo_tok):
    from minitune import load_model
    from minitune.data.own_mistakes import own_mistake_pairs
    from minitune.data.synthetic import is_correct, make_task

    model, examples = load_model(tiny), make_task(12)
    pairs, stats = own_mistake_pairs(model, demo_tok, examples, wanted=5, samples=3, prompts_per_call=4, seed=1)
    assert len(pairs) == stats.pairs == 5 and stats.prompts == stats.pairs + stats.all_right <= 8  # stops when enough
    answers = {ex["answer"] for ex in examples}
    for p in pairs:
        assert p.chosen in answers and p.rejected and not is_correct(p.rejected, p.chosen)
        assert p.prompt.endswith("assistant\n") and "Reply with the answer only." in p.prompt  # as SFT renders it
    again, _ = own_mistake_pairs(model, demo_tok, examples, wanted=5, samples=3, prompts_per_call=4, seed=1)
    assert again == pairs  # the same seed samples the same mistakes


@pytest.mark.slow
def test_recipe_trains_on_own_mistakes_and_resumes_exactly(tiny, tmp_path):
    from minitune.train.metrics import read_metrics

    own = {"data.synthetic_rejected": "own", "run.max_steps": 4, "run.save_every": 2}
    first = run(base_args(tiny, tmp_path / "a", **own))
    assert first["train_pairs_per_rank"] == 16  # max_steps x batch_size: sampled until there are enough
    run(base_args(tiny, tmp_path / "b", **own, **{"run.resume": tmp_path / "a" / "checkpoints" / "step_00000002"}))
    full = [r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "lr" in r]
    resumed = [r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "lr" in r]
    assert len(full) == 4 and resumed == pytest.approx(full[2:], abs=1e-6)  # the same pairs after a resume
    with pytest.raises(MinituneError, match="data.synthetic_rejected=own samples a start adapter's mistakes"):
        load_recipe("reward_model").train(parse_cli(load_recipe("reward_model").RewardConfig,
                                                    ["data.synthetic_rejected=own", f"run.output_dir={tmp_path / 'r'}"]))
