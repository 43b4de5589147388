"""Loading rows with `datasets`: local json / jsonl / jsonl.gz / parquet / csv files and folders,
or hub dataset names when online."""
from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import logging
import lzma
import os
from pathlib import Path
from typing import IO

from minitune.errors import MinituneError

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _builder(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    ext = suffixes[-1] if suffixes else ""
    if ext not in _BUILDERS:
        raise MinituneError(f"{path}: unsupported file type {ext or '(none)'}; use json, jsonl(.gz), parquet or csv")
    return _BUILDERS[ext]


_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_TEXT_BUILDERS = ("json", "csv")


def _open_binary(path: Path) -> IO[bytes] | None:
    """The file's decompressed bytes, or None for a compression Python cannot read by itself."""
    if path.suffix == ".zst":
        return None
    return _OPENERS.get(path.suffix, open)(path, "rb")


def check_text_file(path: Path) -> int:
    """Reads a json/jsonl/csv file once before `datasets` does and returns its count of non-blank lines.

    Raises MinituneError naming the file and line for what `datasets` reports badly or too late: an
    empty file ("StopIteration"), and bytes that are not UTF-8 (accepted at load time, then a
    UnicodeDecodeError mid-training when the row is first read).
    """
    f = _open_binary(path)
    if f is None:
        return -1
    lines = 0
    with f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MinituneError(
                    f"{path}: line {n} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                    "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            lines += bool(text.strip())
    if lines == 0:
        raise MinituneError(f"{path}: the file is empty (no rows); point data.source at a file with rows")
    return lines


def _first_bad_json_line(path: Path) -> str | None:
    """For a jsonl file `datasets` refused: 'line N: <reason>' for the first line that is not a JSON object."""
    f = _open_binary(path)
    if f is None:
        return None
    with f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError as e:
                return f"line {n} is not valid JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')})"
            if not isinstance(row, dict):
                return f"line {n} is a JSON {type(row).__name__}, not an object with named columns"
    return None


@contextlib.contextmanager
def _quiet_datasets():
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def load_rows(source: str | os.PathLike, *, split: str = "train", columns: list[str] | None = None):
    """A `datasets.Dataset` from a local file or folder (or a hub name when online).

    columns: required column names; a missing one is an error listing the columns that exist.
    Raises MinituneError with the path and the reason for unreadable or missing files.
    """
    import datasets

    datasets.disable_progress_bars()
    p = Path(source).expanduser()
    files: list[Path] = []
    try:
        if p.is_file() or p.is_dir():
            files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            if not files:
                raise MinituneError(f"{p}: empty folder")
            builder = _builder(files[0])
            if builder in _TEXT_BUILDERS:
                for f in files:
                    check_text_file(f)
            with _quiet_datasets():  # its parse errors come back as one line below, not a logged block
                ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
        elif str(source).count("/") == 1 and not str(source).startswith((".", "/", "~")):
            ds = datasets.load_dataset(str(source), split=split)
        else:
            raise MinituneError(f"dataset path {source} does not exist")
    except MinituneError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the path and the reason
        for f in files:
            bad = _first_bad_json_line(f) if f.name.endswith((".jsonl", ".jsonl.gz", ".jsonl.bz2", ".jsonl.xz")) else None
            if bad:
                raise MinituneError(f"cannot read dataset {f}: {bad}; fix or remove that line") from None
        reason = str(e.__cause__ or e).strip().splitlines()
        raise MinituneError(f"cannot read dataset {source}: {type(e).__name__}: {(reason[0] if reason else '')[:300]}") from None
    if len(ds) == 0:
        raise MinituneError(f"dataset {source} has no rows; point data.source at data with rows")
    if columns:
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise MinituneError(f"dataset {source}: column(s) {missing} not found; it has {ds.column_names}")
    return ds


def split_rows(rows, holdout: int | float, seed: int = 0):
    """(train, held_out) with a fixed seed; holdout is a count or a fraction."""
    n = len(rows)
    k = int(round(holdout * n)) if isinstance(holdout, float) and holdout < 1 else int(holdout)
    if not 0 < k < n:
        raise MinituneError(f"holdout {holdout} leaves no train or no held-out rows out of {n}")
    import random

    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    held, train = sorted(idx[:k]), sorted(idx[k:])
    pick = (lambda ids: rows.select(ids)) if hasattr(rows, "select") else (lambda ids: [rows[i] for i in ids])
    return pick(train), pick(held)


def source_and_split(source: str, default_split: str = "train") -> tuple[str, str]:
    """"org/name:test" -> ("org/name", "test"); a local path or a name without ":" keeps the default."""
    if Path(source).expanduser().exists() or ":" not in str(source):
        return str(source), default_split
    name, _, split = str(source).rpartition(":")
    return name, split


def train_and_eval_rows(source: str, columns: list[str], *, eval_source: str = "", holdout: float = 0.05,
                        max_rows: int = 0, seed: int = 0):
    """(train rows, held-out rows): the held-out rows come from `eval_source` (a file, folder, or
    hub id with an optional ":split", e.g. "Anthropic/hh-rlhf:test") when given, since most real
    datasets ship their own test split; otherwise `holdout` (a fraction below 1 or a count) is
    carved out of `source` with a fixed seed. `max_rows` caps the training rows."""
    rows = load_rows(source, columns=columns)
    if max_rows:
        rows = rows.select(range(min(max_rows, len(rows))))
    if eval_source:
        name, split = source_and_split(eval_source, "test")
        return rows, load_rows(name, split=split, columns=columns)
    return split_rows(rows, holdout if holdout < 1 else int(holdout), seed=seed)

