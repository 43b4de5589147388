"""Tokenizers without transformers: `tokenizer.json` through `tokenizers`, `tokenizer.model` through
`sentencepiece`, special tokens from the Hugging Face side files, and chat templates rendered in a
sandboxed Jinja environment (a template cannot reach Python internals)."""
from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Sequence

from jinja2 import StrictUndefined, TemplateError, UndefinedError, ext
from jinja2.utils import missing
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from minitune.errors import MinituneError


def _token_str(v) -> str | None:
    if isinstance(v, dict):  # AddedToken serialized form
        return v.get("content")
    return v


class Tokenizer:
    """Encode/decode plus the ids and chat template a recipe needs.

    Attributes: bos_id, eos_id, pad_id (pad falls back to eos), eos_ids (all ids that end
    generation), vocab_size, chat_template.
    """

    def __init__(self, backend, *, kind: str, bos: str | None, eos: str | None, pad: str | None,
                 chat_template: str | None, add_bos: bool, extra_eos_ids: Sequence[int] = (), files: dict | None = None):
        self._tk = backend
        self.kind = kind  # "hf" (tokenizers) or "sp" (sentencepiece)
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos, eos
        self.bos_id = self.token_to_id(bos) if bos else None
        self.eos_id = self.token_to_id(eos) if eos else None
        self.pad_token = pad or eos
        self.pad_id = self.token_to_id(self.pad_token) if self.pad_token else self.eos_id
        self.eos_ids = sorted({i for i in [self.eos_id, *extra_eos_ids] if i is not None})
        self._files = files or {}

    # -- basics --------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size() if self.kind == "hf" else self._tk.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        if self.kind == "hf":
            return self._tk.token_to_id(token)
        i = self._tk.piece_to_id(token)
        return None if i == self._tk.unk_id() and token != self._tk.id_to_piece(i) else i

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; with `add_special_tokens` the model's own additions (e.g. Llama's BOS)."""
        if self.kind == "hf":
            return self._tk.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._tk.encode(text)
        return ([self.bos_id] if add_special_tokens and self.add_bos and self.bos_id is not None else []) + ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Batched encoding (parallel in the Rust backend)."""
        if self.kind == "hf":
            return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            ids = [i for i in ids if not self._tk.is_control(i)]
        return self._tk.decode(ids)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    # -- chat ----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """Renders `messages` ([{role, content}]) with the model's Jinja chat template, sandboxed.

        The variables Hugging Face templates rely on are always passed (`messages`,
        `add_generation_prompt`, `tools` and `documents` as None unless given, the special tokens);
        `kwargs` add or override variables. Raises MinituneError when there is no template, the
        template uses a variable that is not passed (a typo would otherwise render as nothing), or it
        tries anything unsafe.
        """
        if not self.chat_template:
            raise MinituneError("this tokenizer has no chat_template (tokenizer_config.json); use a plain template")
        variables = {"messages": messages, "add_generation_prompt": add_generation_prompt, "tools": None,
                     "documents": None, "bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                     "pad_token": self.pad_token or "", **kwargs}
        try:
            template = _jinja_env().from_string(self.chat_template)
            return template.render(**variables)
        except UndefinedError as e:
            raise MinituneError(
                f"chat template uses an undefined variable ({e}); it is given {', '.join(sorted(variables))}: "
                "fix the template or pass the variable to apply_chat_template"
            ) from None
        except SecurityError as e:
            raise MinituneError(f"chat template rejected: it tries to reach Python internals ({e})") from None
        except TemplateError as e:
            raise MinituneError(f"chat template failed to render: {e}") from None

    # -- files ---------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> None:
        """Writes tokenizer files and tokenizer_config.json into `folder`."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        if self.kind == "hf":
            self._tk.save(str(out / "tokenizer.json"))
        else:
            (out / "tokenizer.model").write_bytes(self._tk.serialized_model_proto())
        cfg = dict(self._files.get("tokenizer_config", {}))
        cfg.update({"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                    "add_bos_token": self.add_bos})
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast" if self.kind == "hf" else "LlamaTokenizer")
        cfg.setdefault("model_max_length", 8192)
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def _raise(message):
    raise TemplateError(message)


class _UndefinedName(StrictUndefined):
    """Strict for names that were never passed (`{{ speaker_tag }}` raises instead of rendering as
    ""), lenient for missing keys of passed values: templates legitimately test `message.tool_calls`
    or `message.get(...)` on messages that lack them, which must stay empty and falsy."""

    def _is_name(self) -> bool:
        return self._undefined_obj is missing

    def __str__(self) -> str:
        return super().__str__() if self._is_name() else ""

    def __iter__(self):
        return super().__iter__() if self._is_name() else iter(())

    def __bool__(self) -> bool:
        return super().__bool__() if self._is_name() else False

    def __len__(self) -> int:
        return super().__len__() if self._is_name() else 0

    def __eq__(self, other) -> bool:
        return super().__eq__(other) if self._is_name() else type(self) is type(other)

    def __ne__(self, other) -> bool:
        return not self.__eq__(other)

    def __contains__(self, item) -> bool:
        return super().__contains__(item) if self._is_name() else False

    def __hash__(self) -> int:
        return id(type(self))


def _jinja_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols],
                                        undefined=_UndefinedName)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise MinituneError(f"{path}: invalid JSON ({e})") from None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer from a model folder (tokenizer.json or tokenizer.model) or a .gguf file.

    bos/eos/pad come from tokenizer_config.json, then special_tokens_map.json, then
    generation_config.json / config.json ids. Raises MinituneError when no tokenizer file exists.
    """
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        from minitune.gguf_import import gguf_tokenizer

        return Tokenizer(**gguf_tokenizer(p))
    if not p.is_dir():
        raise MinituneError(f"tokenizer path {p} does not exist")
    tcfg = _read_json(p / "tokenizer_config.json")
    smap = _read_json(p / "special_tokens_map.json")
    gen = _read_json(p / "generation_config.json")
    mcfg = _read_json(p / "config.json")

    if (p / "tokenizer.json").exists():
        from tokenizers import Tokenizer as HFTokenizer

        backend, kind = HFTokenizer.from_file(str(p / "tokenizer.json")), "hf"
        id_to_token = backend.id_to_token
    elif (p / "tokenizer.model").exists():
        import sentencepiece as spm

        backend, kind = spm.SentencePieceProcessor(model_file=str(p / "tokenizer.model")), "sp"
        id_to_token = backend.id_to_piece
    else:
        raise MinituneError(f"{p}: no tokenizer.json or tokenizer.model")

    def special(name: str) -> str | None:
        tok = _token_str(tcfg.get(f"{name}_token")) or _token_str(smap.get(f"{name}_token"))
        if tok:
            return tok
        tid = gen.get(f"{name}_token_id", mcfg.get(f"{name}_token_id"))
        if isinstance(tid, list):
            tid = tid[0]
        return id_to_token(tid) if isinstance(tid, int) else None

    extra_eos = gen.get("eos_token_id", mcfg.get("eos_token_id"))
    extra_eos = extra_eos if isinstance(extra_eos, list) else ([extra_eos] if isinstance(extra_eos, int) else [])
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    if template is None and (p / "chat_template.jinja").exists():
        template = (p / "chat_template.jinja").read_text()
    return Tokenizer(
        backend, kind=kind, bos=special("bos"), eos=special("eos"), pad=special("pad"),
        chat_template=template, add_bos=bool(tcfg.get("add_bos_token", kind == "sp")),
        extra_eos_ids=extra_eos, files={"tokenizer_config": tcfg},
    )
