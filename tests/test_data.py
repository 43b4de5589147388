"""Packing, masks, sharding, exact resume, real files, preference pairs, prompts, synthetic task."""
import json
import random

import pytest
import torch
from torch.utils.data import DataLoader

from minitune import MinituneError, build_model
from minitune.data import Columns, ConstantLengthDataset, Document, Template, load_rows, make_formatter, tokenize_rows
from minitune.data.preference import PairStats, PreferencePair, hh_chat_pair, hh_messages, parse_pairs, split_hh
from minitune.data.prompts import encode_prompts
from minitune.data.synthetic import (correctness_reward, digit_credit, graded_reward, is_correct, make_task,
                                     near_miss_answer, normalize, order_credit, partial_credit_reward,
                                     train_eval_split, wrong_answer)
from minitune.model import ModelConfig
from conftest import HH_PATH, SELF_INSTRUCT_PATH

CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def id_formatter(rows):
    """Documents whose tokens are given directly: row = {"ids": [...], "train": [...]}."""
    return [Document(list(r["ids"]), list(r.get("train", [True] * len(r["ids"])))) for r in rows], 0


def random_docs(n, seed=0, lo=3, hi=20):
    rng = random.Random(seed)
    return [{"ids": [rng.randrange(3, 64) for _ in range(rng.randint(lo, hi))] + [2]} for _ in range(n)]


def test_packed_documents_do_not_attend_to_each_other():
    model = build_model(CFG, seed=0).eval()
    docs = random_docs(30)
    ds = ConstantLengthDataset(docs, id_formatter, seq_length=48, shard=(0, 1))
    checked = 0
    for block in ds:
        ids, pos = block["input_ids"][None], block["position_ids"][None]
        with torch.no_grad():
            packed = model(ids, pos).logits[0]
        starts = (pos[0] == 0).nonzero().flatten().tolist() + [48]
        for s, e in zip(starts[:-1], starts[1:]):
            alone_ids = ids[:, s:e]
            with torch.no_grad():
                alone = model(alone_ids, pos[:, s:e]).logits[0]
            assert (packed[s:e] - alone).abs().max().item() <= 1e-5
            checked += 1
    assert checked > 20


def test_labels_are_next_tokens_within_documents_and_blocks_are_full():
    docs = [{"ids": [5, 6, 7, 2], "train": [False, False, True, True]}, {"ids": [8, 9, 2], "train": [False, True, True]},
            {"ids": [10, 11, 12, 2]}]
    blocks = list(ConstantLengthDataset(docs, id_formatter, seq_length=5, shard=(0, 1)))
    assert [b["input_ids"].tolist() for b in blocks] == [[5, 6, 7, 2, 8], [9, 2, 10, 11, 12]]
    # 5->6 untrained, 6->7 trained, 7->2 trained, 2->8 crosses documents, 8->9 trained
    assert blocks[0]["labels"].tolist() == [-100, 7, 2, -100, 9]
    assert blocks[0]["position_ids"].tolist() == [0, 1, 2, 3, 0]
    assert blocks[1]["position_ids"].tolist() == [1, 2, 0, 1, 2]
    assert blocks[1]["labels"].tolist() == [2, -100, 11, 12, 2]


def test_long_document_is_split_and_counted():
    docs = [{"ids": list(range(3, 40))}]
    ds = ConstantLengthDataset(docs, id_formatter, seq_length=10, shard=(0, 1), drop_last=False)
    blocks = list(ds)
    assert len(blocks) == 4 and ds.stats.split_documents == 1
    assert blocks[1]["position_ids"][0].item() == 10  # positions continue across blocks
    last = blocks[-1]
    assert (last["labels"] == -100).sum() > 0 and last["input_ids"][-1].item() == 0  # padded tail


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharding_covers_the_source_once(world):
    docs = [{"ids": [3 + i]} for i in range(100)]
    seen = []
    for rank in range(world):
        ds = ConstantLengthDataset(docs, id_formatter, seq_length=4, shard=(rank, world), drop_last=False)
        for b in ds:
            seen += [t for t in b["input_ids"].tolist() if t != 0]
    assert sorted(seen) == [3 + i for i in range(100)]


def test_sharding_with_two_dataloader_workers_per_rank():
    docs = [{"ids": [3 + i]} for i in range(90)]
    seen = []
    for rank in range(3):
        ds = ConstantLengthDataset(docs, id_formatter, seq_length=4, drop_last=False)
        ds.fixed_shard = None
        # emulate torchrun's rank for _shard() by patching the distributed query
        import minitune.data.packing as packing

        orig = packing._shard

        def fake_shard(rank=rank):
            info = torch.utils.data.get_worker_info()
            return rank * info.num_workers + info.id, 3 * info.num_workers

        packing._shard = fake_shard
        try:
            for b in DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork"):
                seen += [t for t in b["input_ids"].tolist() if t != 0]
        finally:
            packing._shard = orig
    assert sorted(seen) == [3 + i for i in range(90)]


@pytest.mark.parametrize("shuffle,infinite", [(0, False), (4, False), (3, True)])
def test_exact_resume(shuffle, infinite):
    docs = random_docs(60, seed=1)
    make = lambda: ConstantLengthDataset(docs, id_formatter, seq_length=16, shuffle_buffer=shuffle, seed=7,  # noqa: E731
                                         infinite=infinite, tokenize_batch=5, shard=(0, 1))
    full = make()
    it = iter(full)
    head = [next(it) for _ in range(7)]
    state = full.state_dict()
    expected = [next(it) for _ in range(12)]
    resumed = make()
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    got = [next(it2) for _ in range(12)]
    for a, b in zip(expected, got):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert head  # and the state is JSON-serializable
    import json

    json.dumps(state)


def test_infinite_restarts_the_source():
    docs = random_docs(5)
    ds = ConstantLengthDataset(docs, id_formatter, seq_length=8, infinite=True, shard=(0, 1))
    it = iter(ds)
    for _ in range(30):
        next(it)
    assert ds.stats.epochs >= 2


# -- templates and masks (real tokenizer) ---------------------------------------------------------


def trained_text(tok, doc):
    return tok.decode([i for i, t in zip(doc.ids, doc.trained) if t], skip_special_tokens=False)


@pytest.mark.slow
def test_completion_only_trains_exactly_the_response(demo_tok):
    tok = demo_tok
    eos = tok.eos_token
    (d,), _ = tokenize_rows([{"prompt": "What is 2+2?", "response": "4, of course."}], tok, Template.STACKLLAMA, Columns())
    assert trained_text(tok, d) == "4, of course." + eos
    assert tok.decode(d.ids, skip_special_tokens=False).startswith("Question: What is 2+2?\n\nAnswer: ")
    (d,), _ = tokenize_rows([{"instruction": "Add", "input": "2 and 2", "output": "Four."}], tok, Template.ALPACA, Columns())
    assert trained_text(tok, d) == "Four." + eos
    assert "### Input:\n2 and 2" in tok.decode(d.ids)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
    (d,), _ = tokenize_rows([{"messages": msgs}], tok, Template.CHAT, Columns())
    assert trained_text(tok, d) == "Hello!<|im_end|>\nGoodbye.<|im_end|>\n"
    # the masks survive packing: labels equal exactly the trained tokens
    ds = ConstantLengthDataset([{"messages": msgs}] * 4, make_formatter("chat", tok), seq_length=32, shard=(0, 1))
    labels = torch.cat([b["labels"] for b in ds])
    trained = [t for i, t in enumerate(d.ids) if d.trained[i] and i > 0]
    assert tok.decode([t for t in labels.tolist() if t != -100][: len(trained)], skip_special_tokens=False) == \
        tok.decode(trained, skip_special_tokens=False)


@pytest.mark.slow
def test_empty_rows_are_skipped_and_counted(demo_tok):
    rows = [{"text": "hello"}, {"text": "   "}, {"text": ""}, {"text": "world"}]
    ds = ConstantLengthDataset(rows, make_formatter("text", demo_tok), seq_length=2, shard=(0, 1))
    list(ds)
    assert ds.stats.skipped_empty == 2 and ds.stats.documents == 2
    assert "skipped 2 empty" in ds.stats.summary()


def test_missing_column_lists_existing(demo_tok):
    with pytest.raises(MinituneError, match=r"column 'prompt' not found; the rows have columns \['question'"):
        tokenize_rows([{"question": "x", "response": "y"}], demo_tok, Template.STACKLLAMA, Columns())


# -- files --------------------------------------------------------------------------------------


def test_real_files_load_through_datasets(hh_rows):  # hh_rows: skips without ../shared/data
    hh = load_rows(HH_PATH, columns=["chosen", "rejected"])
    assert len(hh) == 2312
    si = load_rows(SELF_INSTRUCT_PATH)
    assert len(si) == 175 and "instruction" in si.column_names
    with pytest.raises(MinituneError, match=r"column\(s\) \['prompt'\] not found; it has"):
        load_rows(HH_PATH, columns=["prompt"])


def test_unreadable_file_names_path_and_reason(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{not json\n')
    with pytest.raises(MinituneError, match="bad.jsonl"):
        load_rows(bad)
    with pytest.raises(MinituneError, match="does not exist"):
        load_rows(tmp_path / "nope.jsonl")
    with pytest.raises(MinituneError, match="unsupported file type"):
        load_rows(__file__)


# -- preference pairs and prompts -----------------------------------------------------------------


def test_hh_pairs_share_the_prompt(hh_rows):
    stats = PairStats()
    pairs = parse_pairs(hh_rows[:300], hh_format=True, stats=stats)
    assert stats.kept == len(pairs) and stats.kept + stats.identical + stats.missing_side == 300
    for p, row in zip(pairs[:50], hh_rows):
        assert p.prompt.endswith("\n\nAssistant:")
        assert p.prompt + p.chosen in (row["chosen"],) or row["chosen"].startswith(p.prompt)
    pair = split_hh("\n\nHuman: hi\n\nAssistant: hello", "\n\nHuman: hi\n\nAssistant: go away")
    assert pair.prompt == "\n\nHuman: hi\n\nAssistant:" and pair.chosen == " hello"


def test_hh_dialogues_render_through_the_chat_template(demo_tok):
    dialogue = "\n\nHuman: hi there\n\nAssistant: Hello! \n\nHuman: how do I bake bread?\n\nAssistant:"
    assert hh_messages(dialogue) == [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "Hello!"},
                                     {"role": "user", "content": "how do I bake bread?"}]
    pair = hh_chat_pair(PreferencePair(dialogue, " Mix flour and water.", " No."), demo_tok)
    assert pair.prompt == demo_tok.apply_chat_template(hh_messages(dialogue), add_generation_prompt=True)
    assert pair.prompt.endswith("<|im_start|>assistant\n") and "Human:" not in pair.prompt
    assert (pair.chosen, pair.rejected) == ("Mix flour and water.", "No.")


def test_bad_pairs_are_skipped_with_counts():
    stats = PairStats()
    rows = [{"chosen": "a", "rejected": "b"}, {"chosen": "a", "rejected": "a"}, {"chosen": "", "rejected": "x"},
            {"chosen": None, "rejected": "x"}]
    assert len(parse_pairs(rows, stats=stats)) == 1
    assert (stats.identical, stats.missing_side) == (1, 2)


def test_prompts_truncate_with_count(demo_tok):
    ids, truncated = encode_prompts(["short", "long " * 200], demo_tok, max_length=64)
    assert truncated == 1 and len(ids[1]) == 64 and len(ids[0]) < 64


# -- synthetic task -------------------------------------------------------------------------------


def test_synthetic_task_is_deterministic_disjoint_and_scored():
    train, ev = train_eval_split(n_train=400, n_eval=100, seed=3)
    assert train == train_eval_split(n_train=400, n_eval=100, seed=3)[0]
    assert not {e["prompt"] for e in ev} & {t["prompt"] for t in train}
    assert {e["family"] for e in ev} == {"add", "reverse", "sort", "convert"}
    rng = random.Random(0)
    for ex in make_task(40):
        assert is_correct(ex["answer"] + ".", ex["answer"]) and is_correct(" " + ex["answer"] + "\nmore", ex["answer"])
        assert not is_correct(wrong_answer(ex, rng), ex["answer"])
    assert correctness_reward(["1571", "no"], ["1571", "3"]) == [1.0, 0.0]


def test_near_miss_answers_are_wrong_by_one_slip_of_the_right_form():
    rng = random.Random(0)
    for ex in make_task(2000):
        ans, miss = ex["answer"], near_miss_answer(ex, rng)
        assert not is_correct(miss, ans), ex
        if ex["family"] in ("reverse", "sort"):  # the same numbers, two neighbours swapped
            a, m = ans.split(", "), normalize(miss).split(", ")
            diff = [i for i in range(len(a)) if a[i] != m[i]]
            assert sorted(a) == sorted(m) and len(diff) == 2 and diff[1] == diff[0] + 1, (ans, miss)
        elif ex["family"] == "add":  # one power of ten off: a carry slip
            assert abs(int(miss) - int(ans)) in {1, 10, 100, 1000}, (ans, miss)
        else:  # another factor applied to the same quantity
            n = int(ex["prompt"].split()[1])
            assert int(miss) % n == 0 and int(miss) != int(ans), (ex["prompt"], miss)


def test_order_credit_counts_the_pairs_in_their_reference_order():
    import itertools

    ref = "9, 37, 38, 54"
    for perm in itertools.permutations(ref.split(", ")):  # against a brute-force count of ordered pairs
        want = sum(perm.index(a) < perm.index(b) for a, b in itertools.combinations(ref.split(", "), 2)) / 6
        assert order_credit(", ".join(perm), ref) == pytest.approx(want)
    assert order_credit(" 9,37 , 38, 54.", ref) == 1.0  # normalized like is_correct
    # the SFT adapter's mistake (a one-digit number placed like text) earns less than a step toward its place
    assert order_credit("37, 38, 54, 9", ref) < order_credit("37, 38, 9, 54", ref) < order_credit("37, 9, 38, 54", ref)
    assert order_credit("9, 37, 38", ref) == pytest.approx(3 / 6 * 3 / 4)  # a dropped item loses its pairs and length
    assert order_credit("9, 37, 38, 54, 54", ref) == pytest.approx(4 / 5)  # an extra item costs the length ratio
    assert order_credit("", ref) == 0.0 and order_credit("I cannot", ref) == 0.0


def test_partial_credit_reward_keeps_exact_answers_on_top():
    rng = random.Random(0)
    for ex in make_task(400):
        ans, miss = ex["answer"], near_miss_answer(ex, rng)
        right, wrong, echo = partial_credit_reward([ans, miss, wrong_answer(ex, rng)], [ans] * 3)
        assert right == 1.0 and 0.0 <= echo < 0.5 and 0.0 <= wrong < 0.5
        if ex["family"] in ("reverse", "sort"):  # a swapped neighbour pair loses one pair of many
            assert wrong > 0.3
        else:
            assert wrong == 0.0  # numbers: right or wrong
    assert partial_credit_reward(["1571", "no", "2, 1"], ["1571", "3", "1, 2"]) == [1.0, 0.0, 0.0]


def test_synthetic_pairs_take_the_rejected_kind_from_the_config(demo_tok):
    from minitune.data.preference import load_preference_pairs
    from minitune.train.sections import DataSection

    echo, _, _ = load_preference_pairs(DataSection(synthetic_train=40, synthetic_eval=8), demo_tok, 0)
    near, _, _ = load_preference_pairs(DataSection(synthetic_train=40, synthetic_eval=8,
                                                   synthetic_rejected="near_miss"), demo_tok, 0)
    assert [p.chosen for p in echo] == [p.chosen for p in near]
    given = [p.prompt for p in echo]
    assert sum(p.rejected in q for p, q in zip(echo, given)) >= len(echo) - 2  # the input given back (an already sorted list: rotated)
    assert sum(p.rejected in q for p, q in zip(near, given)) < len(near) // 2


def test_held_out_rows_come_from_eval_source_when_given(tmp_path, demo_tok):
    from minitune.data.loading import source_and_split, train_and_eval_rows
    from minitune.data.preference import load_preference_pairs
    from minitune.train.sections import DataSection

    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n"
                             for i in range(20)))
    test.write_text("".join(json.dumps({"prompt": f"t{i}", "chosen": f"yes {i}", "rejected": f"no {i}"}) + "\n"
                            for i in range(5)))
    cols = ["chosen", "rejected"]
    rows, held = train_and_eval_rows(str(train), cols, eval_source=str(test), holdout=4)
    assert len(rows) == 20 and list(held["prompt"]) == [f"t{i}" for i in range(5)]
    rows, held = train_and_eval_rows(str(train), cols, holdout=4)  # carved out of the source instead
    assert (len(rows), len(held)) == (16, 4) and not set(held["prompt"]) & set(rows["prompt"])
    assert source_and_split("Anthropic/hh-rlhf:test") == ("Anthropic/hh-rlhf", "test")
    assert source_and_split(str(test)) == (str(test), "train") and source_and_split("org/name") == ("org/name", "train")
    pairs, evals, stats = load_preference_pairs(DataSection(source=str(train), eval_source=str(test)), demo_tok, 0)
    assert len(pairs) == 20 and [p.prompt for p in evals] == [f"t{i}" for i in range(5)]
    with pytest.raises(MinituneError, match="does not exist"):
        train_and_eval_rows(str(train), cols, eval_source=str(tmp_path / "missing.jsonl"))


def test_digit_credit_and_graded_reward():
    # digits compared place by place from the units, over the longer number; graded_reward: exact 1, else half
    # the list's order credit or the number's digit credit
    assert digit_credit("1451", "1461") == 0.75 and digit_credit(" 1461.", "1461") == 1.0
    assert digit_credit("500", "600") == pytest.approx(2 / 3)
    assert digit_credit("461", "1461") == 0.75  # a dropped leading digit costs one place
    assert digit_credit("11461", "1461") == pytest.approx(4 / 5)
    assert digit_credit("14.61", "1461") == 0.0 and digit_credit("", "1461") == 0.0 and digit_credit("x", "x") == 1.0
    got = graded_reward(["1461", "1451", "9, 37, 38, 54", "37, 38, 54, 9", "I cannot"],
                        ["1461", "1461", "9, 37, 38, 54", "9, 37, 38, 54", "1461"])
    assert got == pytest.approx([1.0, 0.375, 1.0, 0.5 * order_credit("37, 38, 54, 9", "9, 37, 38, 54"), 0.0])
    rng = random.Random(0)
    for ex in make_task(200):  # exact answers stay on top of every near miss
        miss = near_miss_answer(ex, rng)
        right, near = graded_reward([ex["answer"], miss], [ex["answer"]] * 2)
        assert right == 1.0 and 0.0 <= near < 0.5
