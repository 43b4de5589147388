"""Bad input gets one clear error naming the problem."""
import json

import pytest
import torch
from safetensors.torch import save_file

from minitune import MinituneError, load_model, load_tokenizer
from helpers import make_hf_model


@pytest.fixture
def folder(tmp_path):
    make_hf_model("llama2").save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_missing_folder(tmp_path):
    with pytest.raises(MinituneError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MinituneError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_folder_without_weights(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(MinituneError, match="no weights"):
        load_model(folder)


def test_unsupported_model_type(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MinituneError, match="supported: llama, mistral, qwen2"):
        load_model(folder)


def _rewrite(folder, fn):
    from minitune.checkpoint import iter_safetensors

    sd = dict(iter_safetensors(folder / "model.safetensors"))
    fn(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))


def test_missing_tensor_is_named(folder):
    _rewrite(folder, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MinituneError, match="missing.*model.layers.1.mlp.up_proj.weight"):
        load_model(folder)


def test_extra_tensor_is_named(folder):
    _rewrite(folder, lambda sd: sd.__setitem__("model.layers.0.surprise", torch.zeros(2)))
    with pytest.raises(MinituneError, match="unexpected.*model.layers.0.surprise"):
        load_model(folder)


def test_shape_mismatch_is_named(folder):
    _rewrite(folder, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(63)))
    with pytest.raises(MinituneError, match=r"model.norm.weight has shape \(63,\)"):
        load_model(folder)


def test_truncated_safetensors(folder):
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(MinituneError, match="truncated"):
        load_model(folder)


def test_pickle_only_folder_is_refused(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(MinituneError, match="pickle"):
        load_model(folder)


def test_no_tokenizer_files(folder):
    with pytest.raises(MinituneError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(folder)


def test_no_pickle_loading_in_the_library():
    import pathlib

    import minitune

    for p in pathlib.Path(minitune.__file__).parent.rglob("*.py"):
        for line in p.read_text().splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{p}: {line.strip()}"
