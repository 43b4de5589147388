"""Hugging Face checkpoint folders: `config.json` plus `model.safetensors` or sharded safetensors.

Loading builds the model on the `meta` device and assigns each tensor as it is read, one tensor at
a time, so a load never holds two copies of the weights. Tensors are read with plain file reads
rather than a memory map, which keeps resident memory equal to what the model holds (and lets a
quantizing load stay near the quantized size: see `minitune.quant`).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from minitune.errors import MinituneError
from minitune.model import ModelConfig, Transformer

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Old checkpoints carry RoPE tables; minitune computes them, so these are skipped, not "unexpected".
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------------------------
# safetensors reading


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Returns ({name: {dtype, shape, data_offsets}}, data_start). Raises on a truncated file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise MinituneError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise MinituneError(f"{path}: truncated safetensors file (header says {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise MinituneError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise MinituneError(
            f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, the file has {size}"
        )
    return header, 8 + n


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) one at a time, each read into its own fresh CPU buffer."""
    header, start = read_safetensors_header(path)
    with open(path, "rb") as f:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if info["dtype"] not in _ST_DTYPES:
                raise MinituneError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            b, e = info["data_offsets"]
            f.seek(start + b)
            buf = bytearray(e - b)
            f.readinto(buf)
            dtype = _ST_DTYPES[info["dtype"]]
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            yield name, t.reshape(info["shape"])


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise MinituneError(f"{folder}: shard(s) listed in model.safetensors.index.json are missing: {missing}")
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    if list(folder.glob("*.bin")) or list(folder.glob("*.pth")):
        raise MinituneError(
            f"{folder}: only pickle weights (*.bin/*.pth) found; minitune reads safetensors. Convert them once "
            "with torch.load(..., weights_only=True) and safetensors.torch.save_file."
        )
    raise MinituneError(f"{folder}: no weights (expected model.safetensors or model.safetensors.index.json)")


# ----------------------------------------------------------------------------------------------
# loading


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A local folder or .gguf file; a hub repo id is resolved to a local snapshot when
    `huggingface_hub` is installed and the machine is online."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    s = str(path)
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise MinituneError(f"model path {s!r} does not exist (and huggingface_hub is not installed)") from None
        try:
            return Path(snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
        except Exception as e:  # offline, gated, unknown repo: all end here with the reason
            raise MinituneError(f"model path {s!r} is not a local folder and the hub download failed: {e}") from None
    raise MinituneError(f"model path {s!r} does not exist")


def read_config(folder: Path) -> ModelConfig:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise MinituneError(f"{folder}: no config.json (a Hugging Face model folder needs one)")
    try:
        hf = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise MinituneError(f"{cfg_path}: invalid JSON ({e})") from None
    return ModelConfig.from_hf(hf)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_path, _, attr = name.rpartition(".")
    return model.get_submodule(mod_path), attr


def assign_tensors(
    model: Transformer,
    tensors: Iterator[tuple[str, torch.Tensor]],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    source: str,
    strict: bool = True,
) -> None:
    """Assigns named tensors onto a (meta-built) model one by one, checking names and shapes.

    A module may take over its own weight by defining `load_weight_(name, tensor, device)`: the
    quantized linears use this to quantize each weight the moment it is read.
    """
    expected = dict(model.named_parameters())
    tied = model.config.tie_word_embeddings
    seen: set[str] = set()
    unexpected = []
    for name, t in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        owner, attr = _owner(model, name) if name in expected or _has_loader(model, name) else (None, None)
        if owner is None:
            unexpected.append(name)
            continue
        if hasattr(owner, "load_weight_"):
            owner.load_weight_(attr, t, device)
            del t
            _release_freed_heap()
        else:
            p = expected[name]
            if tuple(p.shape) != tuple(t.shape):
                raise MinituneError(
                    f"{source}: tensor {name} has shape {tuple(t.shape)} but the config needs {tuple(p.shape)}"
                )
            new = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            setattr(owner, attr, nn.Parameter(new, requires_grad=p.requires_grad))
        seen.add(name)
    if strict and unexpected:
        raise MinituneError(f"{source}: unexpected tensor(s) not in the model: {unexpected[:8]}")
    model.tie_weights()
    missing = [n for n in expected if n not in seen and not (tied and n == "lm_head.weight")]
    if strict and missing:
        raise MinituneError(f"{source}: missing tensor(s): {missing[:8]}" + (" ..." if len(missing) > 8 else ""))


def _release_freed_heap() -> None:
    """Returns freed heap memory to the OS (glibc). Each quantized layer frees its full-precision
    read buffer; glibc's adaptive mmap threshold would otherwise keep those buffers in the heap and
    a quantizing load would peak at ~2.5x the quantized size instead of ~1.2x (benchmarks/load_memory.py)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def _has_loader(model: nn.Module, name: str) -> bool:
    mod_path, _, _ = name.rpartition(".")
    try:
        return hasattr(model.get_submodule(mod_path), "load_weight_")
    except AttributeError:
        return False


def load_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quant=None,
    transform: Callable[[Transformer], None] | None = None,
) -> Transformer:
    """Loads a Hugging Face folder (or a `.gguf` file) into a minitune `Transformer`.

    quant: a `minitune.quant.QuantConfig` to quantize linear layers while reading (peak memory near
    the quantized size). Returns the model in eval mode. Raises `MinituneError` for a folder without
    config or weights, an unsupported model_type, missing/unexpected tensors or wrong shapes.
    """
    p = resolve_model_path(path)
    if p.is_file() and p.suffix == ".gguf":
        from minitune.gguf_import import gguf_config, iter_gguf_tensors

        cfg = gguf_config(p)
        tensors: Callable[[], Iterator] = lambda: iter_gguf_tensors(p, cfg)  # noqa: E731
    elif p.is_dir():
        cfg = read_config(p)
        files = weight_files(p)
        tensors = lambda: (item for f in files for item in iter_safetensors(f))  # noqa: E731
    else:
        raise MinituneError(f"{p}: expected a model folder or a .gguf file")
    with torch.device("meta"):
        model = Transformer(cfg)
    if quant is not None:
        from minitune.quant import quantize

        quantize(model, quant)
    assign_tensors(model, tensors(), dtype=dtype, device=device, source=str(p))
    if transform is not None:
        transform(model)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# saving


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """Writes to a temporary name and renames, so a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names; refuses models with extra (LoRA, quantized) parts."""
    with torch.device("meta"):
        layout = set(Transformer(model.config).state_dict())
    sd = model.state_dict()
    extra = sorted(set(sd) - layout)
    if extra:
        raise MinituneError(
            f"the model has parameters outside the Hugging Face layout (e.g. {extra[0]}); merge LoRA "
            "adapters first (minitune.lora.merge_for_export or recipes/merge_adapter.py)"
        )
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_model(model: Transformer, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30, tokenizer=None) -> Path:
    """Writes config.json and safetensors (sharded with an index past `max_shard_bytes`), plus the
    tokenizer files when given. `transformers.AutoModelForCausalLM.from_pretrained` reads the folder."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    sd = hf_state_dict(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v.cpu()
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_save_safetensors(shards[0], out / "model.safetensors", meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_save_safetensors(shard, out / name, meta)
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(out / "model.safetensors.index.json", json.dumps(index, indent=2))
    hf = model.config.to_hf()
    dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
    hf["torch_dtype"] = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    atomic_write_text(out / "config.json", json.dumps(hf, indent=2))
    if tokenizer is not None:
        tokenizer.save(out)
    return out
