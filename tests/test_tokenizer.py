"""Tokenizer parity with transformers.AutoTokenizer on real text, chat templates, SentencePiece."""
import pytest
from transformers import AutoTokenizer

from minitune import MinituneError, load_tokenizer
from minitune.tokenizer import Tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_tok(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir)


def texts(hh_rows, n=200):
    out = []
    for row in hh_rows[:n]:
        out.append(row["chosen"])
    return out


def test_ids_and_decode_match_transformers(demo_tok, hf_tok, hh_rows):
    sample = texts(hh_rows) + ["Prices: 12345 and 3.14159!", "  leading spaces\n\ttabs", "émigré naïve 日本語"]
    assert len(sample) >= 200
    ours = demo_tok.encode_batch(sample)
    for text, ids in zip(sample, ours):
        assert ids == hf_tok(text)["input_ids"]
        assert demo_tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True) == text


def test_special_tokens(demo_tok, hf_tok):
    assert demo_tok.eos_id == hf_tok.eos_token_id
    assert demo_tok.pad_id == hf_tok.pad_token_id
    assert demo_tok.bos_id == hf_tok.bos_token_id


def test_chat_template_matches_transformers(demo_tok, hf_tok):
    chats = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    ]
    for msgs in chats:
        for gen in (False, True):
            assert demo_tok.apply_chat_template(msgs, add_generation_prompt=gen) == hf_tok.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=gen)


def test_gguf_tokenizer_equals_folder_tokenizer(demo_gguf, demo_tok, hh_rows):
    g = load_tokenizer(demo_gguf)
    for text in texts(hh_rows, 50) + ["digits 2024 split one by one"]:
        assert g.encode(text) == demo_tok.encode(text)
    assert g.encode("2024") == [g.token_to_id(c) for c in "2024"]  # llama.cpp's smollm rule


def test_chat_template_cannot_reach_python_internals(demo_tok):
    evil = Tokenizer(demo_tok._tk, kind="hf", bos=None, eos="<|im_end|>", pad=None, add_bos=False,
                     chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(MinituneError, match="rejected"):
        evil.apply_chat_template([{"role": "user", "content": "x"}])
    evil.chat_template = "{{ messages.append(1) }}"
    with pytest.raises(MinituneError):
        evil.apply_chat_template([{"role": "user", "content": "x"}])


def test_sentencepiece_trained_on_hh_roundtrips(tmp_path, hh_rows):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(r["chosen"].replace("\n", " ") for r in hh_rows[:400]))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=500,
                                   model_type="bpe", bos_id=1, eos_id=2, pad_id=3, unk_id=0,
                                   character_coverage=1.0, byte_fallback=True, minloglevel=2)
    folder = tmp_path / "sp"
    folder.mkdir()
    (tmp_path / "tokenizer.model").rename(folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}')
    tok = load_tokenizer(folder)
    assert tok.kind == "sp" and tok.vocab_size == 500
    for row in hh_rows[400:450]:
        text = " ".join(row["chosen"].split())
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id
        assert tok.decode(ids) == text
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert tok.encode("Hello there, friend.") == [1] + sp.encode("Hello there, friend.")
    tok.save(tmp_path / "saved")  # save/load keeps the model and special tokens
    again = load_tokenizer(tmp_path / "saved")
    assert again.encode("Hello there, friend.") == tok.encode("Hello there, friend.")
    assert (again.bos_id, again.eos_id) == (tok.bos_id, tok.eos_id)
