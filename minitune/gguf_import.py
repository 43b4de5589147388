"""Import of Llama-architecture GGUF files (needs the optional `gguf` package: `pip install minitune[gguf]`).

Tensors are dequantized to float32 with `gguf`'s own kernels and renamed to Hugging Face names.
llama.cpp's converter permutes the rows of q_proj and k_proj so that its RoPE can rotate adjacent
pairs; Hugging Face's RoPE rotates the two halves of each head, so the permutation is undone here.
The tokenizer embedded in the file (BPE / "gpt2" family) is rebuilt with `tokenizers`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from minitune.errors import MinituneError
from minitune.model import ModelConfig

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# llama.cpp pre-tokenizer names whose regex first isolates every digit (\p{N}) before the GPT-2 split.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva", "command-r"}


def _reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise MinituneError("reading .gguf files needs the gguf package: pip install 'minitune[gguf]'") from None
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise MinituneError(f"{path}: cannot read GGUF file ({e})") from None


def _field(r, key, default=None):
    f = r.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(path: Path) -> ModelConfig:
    """The ModelConfig described by a GGUF file's metadata; raises for non-llama architectures."""
    r = _reader(path)
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise MinituneError(f"{path}: GGUF architecture {arch!r} is not supported; supported: llama")
    names = {t.name for t in r.tensors}
    if "rope_freqs.weight" in names:
        raise MinituneError(f"{path}: GGUF with llama3 rope_freqs is not supported; load the Hugging Face folder")
    g = lambda k, d=None: _field(r, f"llama.{k}", d)  # noqa: E731
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    scaling = None
    if g("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
    n_vocab = g("vocab_size") or len(r.fields["tokenizer.ggml.tokens"].data)
    return ModelConfig(
        vocab_size=int(n_vocab), hidden_size=hidden, intermediate_size=int(g("feed_forward_length")),
        num_hidden_layers=int(g("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(g("attention.head_count_kv", heads)),
        head_dim=int(g("rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(g("context_length", 2048)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(g("rope.freq_base", 10000.0)), rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in names, model_type="llama",
        bos_token_id=_field(r, "tokenizer.ggml.bos_token_id"), eos_token_id=_field(r, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(r, "tokenizer.ggml.padding_token_id"),
    )


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: rows grouped (head, pair, 2) back to (head, 2, half)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, idx, part = base.split(".", 2)
        mapped = _LAYER_NAMES.get(part)
        return f"model.layers.{idx}.{mapped}.{suffix}" if mapped else None
    mapped = _GLOBAL_NAMES.get(base)
    return f"{mapped}.{suffix}" if mapped else None


def iter_gguf_tensors(path: Path, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (Hugging Face name, float32 tensor) one at a time, dequantized and un-permuted."""
    from gguf.quants import dequantize

    r = _reader(path)
    for t in r.tensors:
        name = hf_name(t.name)
        if name is None:
            raise MinituneError(f"{path}: unexpected GGUF tensor {t.name}")
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        w = dequantize(t.data, t.tensor_type).reshape(shape)
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, cfg.num_key_value_heads)
        yield name, torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True))


def gguf_tokenizer(path: Path) -> dict:
    """The tokenizer inside a GGUF, as the keyword arguments of `minitune.tokenizer.Tokenizer`:
    a `tokenizers` backend rebuilt from the vocabulary and merges, special tokens, chat template
    (`load_tokenizer(path.gguf)` builds the Tokenizer; this module does not import that one).

    Only BPE ("gpt2"-family) vocabularies are embedded-importable; for SentencePiece ("llama")
    GGUFs load the original tokenizer folder with `load_tokenizer(folder)`.
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    r = _reader(path)
    kind = _field(r, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise MinituneError(
            f"{path}: embedded tokenizer type {kind!r} cannot be imported; pass the original tokenizer "
            "folder to load_tokenizer() instead"
        )
    tokens = _field(r, "tokenizer.ggml.tokens")
    types = _field(r, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(r, "tokenizer.ggml.merges")]
    tk = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _field(r, "tokenizer.ggml.pre") in _DIGIT_SPLIT_PRE:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    # token_type 3 = control, 4 = user-defined: both are matched whole, before BPE.
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)])
    tid = lambda key: _field(r, key)  # noqa: E731
    name = lambda i: tokens[i] if i is not None else None  # noqa: E731
    bos_id = tid("tokenizer.ggml.bos_token_id")
    if _field(r, "tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        from tokenizers.processors import TemplateProcessing

        tk.post_processor = TemplateProcessing(single=f"{tokens[bos_id]} $A", special_tokens=[(tokens[bos_id], bos_id)])
    return dict(
        backend=tk, kind="hf", bos=name(tid("tokenizer.ggml.bos_token_id")), eos=name(tid("tokenizer.ggml.eos_token_id")),
        pad=name(tid("tokenizer.ggml.padding_token_id")), chat_template=_field(r, "tokenizer.chat_template"),
        add_bos=bool(_field(r, "tokenizer.ggml.add_bos_token", False)),
    )
