"""Reward modelling: the loss by hand, pooling with any padding, save/load, a second adapter on a
shared base, peft's sequence-classification model as the oracle, and the recipe end to end."""
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from minitune import MinituneError, build_model, load_model
from minitune.adapters import read_adapter_metadata, save_adapter
from minitune.lora import LoRAConfig, LoRALinear, apply_lora, base_parameter_bytes, set_adapter, use_adapter
from minitune.model import ModelConfig
from minitune.reward import RewardHead, last_token_index, load_reward_adapter, pairwise_loss, sequence_rewards
from minitune.train.config import parse_cli
from helpers import load_recipe, make_hf_model, tiny_with_real_tokenizer

CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def test_loss_accuracy_margin_centering_by_hand():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    ls = lambda x: math.log(1 / (1 + math.exp(-x)))  # noqa: E731
    m = pairwise_loss(rc, rr)
    assert m.loss.item() == pytest.approx(-(ls(2) + ls(-1)) / 2, abs=1e-6)
    assert m.accuracy.item() == 0.5 and m.margin.item() == pytest.approx(0.5)
    m = pairwise_loss(rc, rr, margin=1.0, center_coef=0.01)
    assert m.loss.item() == pytest.approx(-(ls(1) + ls(-2)) / 2 + 0.01 * (4 + 1) / 2, abs=1e-6)


def randomize(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for a in m.adapters.values():
                    a.lora_B.normal_(0, 0.05)


def test_pooling_left_and_right_padding_agree_even_when_pad_is_eos():
    model = build_model(CFG, seed=0).eval()
    head = RewardHead(64)
    eos = pad = 2
    seqs = [[5, 6, 7, eos], [9, 10, eos], [11, eos]]  # every row ends with EOS == pad
    S = 5
    right = torch.full((3, S), pad)
    rmask = torch.zeros(3, S, dtype=torch.long)
    left = torch.full((3, S), pad)
    lmask = torch.zeros(3, S, dtype=torch.long)
    for i, s in enumerate(seqs):
        right[i, : len(s)] = torch.tensor(s)
        rmask[i, : len(s)] = 1
        left[i, S - len(s):] = torch.tensor(s)
        lmask[i, S - len(s):] = 1
    assert last_token_index(rmask).tolist() == [3, 2, 1]
    with torch.no_grad():
        r_right = sequence_rewards(model, head, right, rmask)
        r_left = sequence_rewards(model, head, left, lmask)
        alone = torch.stack([sequence_rewards(model, head, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
                             for s in seqs])
    assert torch.allclose(r_right, alone, atol=1e-5) and torch.allclose(r_left, alone, atol=1e-5)


def test_reward_and_policy_adapters_share_one_base(tmp_path):
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones_like(ids)
    # a reward model, saved
    rm = build_model(CFG, seed=0)
    apply_lora(rm, LoRAConfig(r=4, target_modules="all-linear"), "reward")
    randomize(rm)
    head = RewardHead(64)
    with torch.no_grad():
        expected_reward = sequence_rewards(rm, head, ids, mask)
    save_adapter(rm, tmp_path / "rm", "reward", extra_tensors=head.tensors(), task_type="SEQ_CLS", modules_to_save=["score"])
    # a policy on a fresh copy of the same base, then the reward model loaded beside it
    model = build_model(CFG, seed=0)
    apply_lora(model, LoRAConfig(r=8, target_modules=("q_proj", "v_proj")), "policy")
    randomize(model)
    with torch.no_grad():
        policy_logits = model(ids).logits
    before = base_parameter_bytes(model)
    loaded_head = load_reward_adapter(model, tmp_path / "rm", "reward")
    assert base_parameter_bytes(model) == before  # no second copy of the base
    with torch.no_grad():
        with use_adapter(model, "reward"):
            assert torch.allclose(sequence_rewards(model, loaded_head, ids, mask), expected_reward, atol=1e-6)
        set_adapter(model, "policy")
        assert torch.allclose(model(ids).logits, policy_logits, atol=1e-6)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".reward." in n)


def pairwise_fit_gain(lr: float) -> float:
    """Held-in pairwise loss drop after 10 AdamW steps of a LoRA adapter + head on 8 fixed pairs."""
    torch.manual_seed(0)
    model = build_model(CFG, seed=0)
    apply_lora(model, LoRAConfig(r=4, target_modules="all-linear"), "reward")
    head = RewardHead(64)
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randint(0, 64, (8, 12), generator=g), torch.randint(0, 64, (8, 12), generator=g)
    mask = torch.ones_like(chosen)
    opt = torch.optim.AdamW([p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad], lr=lr)
    losses = []
    for _ in range(10):
        m = pairwise_loss(sequence_rewards(model, head, chosen, mask), sequence_rewards(model, head, rejected, mask))
        m.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(m.loss.item())
    return losses[0] - losses[-1]


# Measured on this project's CPU: the loss drops by 1.53 at lr 1e-2 (and 3e-3) and by exactly 0 at
# lr=0; the assertion asks for half.
MIN_FIT_GAIN = 0.77


def test_reward_model_fits_pairs_and_the_lr0_control_does_not():
    assert pairwise_fit_gain(1e-2) > MIN_FIT_GAIN
    assert not pairwise_fit_gain(0.0) > MIN_FIT_GAIN


def test_wrong_head_width_is_a_clear_error(tmp_path):
    rm = build_model(CFG, seed=0)
    apply_lora(rm, LoRAConfig(r=4), "reward")
    save_adapter(rm, tmp_path / "rm", "reward", extra_tensors={"score.weight": torch.zeros(1, 32)})
    with pytest.raises(MinituneError, match=r"reward head score.weight has shape \(1, 32\) but this base needs \(1, 64\)"):
        load_reward_adapter(build_model(CFG, seed=0), tmp_path / "rm")


def test_peft_sequence_classification_gives_the_same_reward(tmp_path):
    hf = make_hf_model("llama2")
    hf.save_pretrained(tmp_path / "base")
    ours = load_model(tmp_path / "base")
    apply_lora(ours, LoRAConfig(r=4, alpha=8, target_modules="all-linear"), "reward")
    randomize(ours)
    head = RewardHead(64)
    save_adapter(ours, tmp_path / "rm", "reward", extra_tensors=head.tensors(), task_type="SEQ_CLS", modules_to_save=["score"])
    # transformers pools at the last token that is not pad_token_id; give it an id the text lacks
    # (with pad == eos it would move the pooled position: transformers #35352).
    cls = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=1, pad_token_id=127)
    peft_rm = PeftModel.from_pretrained(cls, tmp_path / "rm").eval()
    ids = torch.randint(0, 120, (1, 10))
    with torch.no_grad():
        ref = peft_rm(ids).logits[0, 0]
        mine = sequence_rewards(ours, head, ids, torch.ones_like(ids))[0]
    assert abs(ref.item() - mine.item()) <= 1e-4


@pytest.mark.slow
def test_reward_recipe_runs_and_resumes_exactly(demo_dir, tmp_path):
    rec = load_recipe("reward_model")
    tiny = tiny_with_real_tokenizer(tmp_path / "m", demo_dir)
    args = [f"model.path={tiny}", "run.progress=false", "run.max_steps=6", "run.batch_size=4", "run.save_every=2",
            "run.keep_last=5", "data.synthetic_train=64", "data.synthetic_eval=16", "optim.lr=1e-2", "lora.r=4",
            "lora.dropout=0.1"]
    full = rec.train(parse_cli(rec.RewardConfig, args + [f"run.output_dir={tmp_path / 'a'}"]))
    from minitune.train.metrics import read_metrics

    losses = [r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert set(full["after"]) == {"eval_loss", "eval_accuracy", "eval_reward_mean", "eval_reward_std"}
    rec.train(parse_cli(rec.RewardConfig, args + [f"run.output_dir={tmp_path / 'b'}",
                                                 f"run.resume={tmp_path / 'a' / 'checkpoints' / 'step_00000002'}"]))
    resumed = [r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert resumed == pytest.approx(losses[2:], abs=1e-6)
    # the saved reward model loads as a named adapter with its head
    head = load_reward_adapter(load_model(tiny), tmp_path / "a" / "adapter")
    assert head.score.weight.shape == (1, 64)
    assert read_adapter_metadata(tmp_path / "a" / "adapter") == {"rendering": "synthetic"}


def test_ppo_and_grpo_refuse_a_reward_adapter_of_another_rendering_before_loading(tmp_path, capsys):
    model = build_model(CFG, seed=0)
    apply_lora(model, LoRAConfig(r=2), "reward")
    for folder, meta in (("hh_raw", {"rendering": "hh-raw"}), ("unknown", None)):
        save_adapter(model, tmp_path / folder, "reward", extra_tensors=RewardHead(64).tensors(), task_type="SEQ_CLS",
                     metadata=meta)
    for name, cls in (("ppo", "PPOConfig"), ("grpo", "GRPOConfig")):
        rec = load_recipe(name)
        args = [f"model.path={tmp_path / 'no_model'}", "data.source=hh.jsonl", "data.hh_format=true", "data.hh_chat=true",
                "init_adapter=", f"run.output_dir={tmp_path / name}"]
        with pytest.raises(MinituneError, match=r"rendered as 'hh-raw', but data renders them as 'hh-chat'; "
                                                r"use data.hh_chat=false"):
            rec.train(parse_cli(getattr(rec, cls), args + [f"reward.adapter={tmp_path / 'hh_raw'}"]))
        with pytest.raises(MinituneError, match="no adapter_config.json"):
            rec.train(parse_cli(getattr(rec, cls), args + [f"reward.adapter={tmp_path / 'missing'}"]))
        with pytest.raises(Exception):  # no record: a note, then the run goes on (and stops at the missing model)
            rec.train(parse_cli(getattr(rec, cls), args + [f"reward.adapter={tmp_path / 'unknown'}"]))
        assert "does not record how its prompts were rendered" in capsys.readouterr().out
