"""Loading rows with `datasets`: local json / jsonl / jsonl.gz / parquet / csv files and folders,
or hub dataset names when online."""
from __future__ import annotations

import os
from pathlib import Path

from minitune.errors import MinituneError

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _builder(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    ext = suffixes[-1] if suffixes else ""
    if ext not in _BUILDERS:
        raise MinituneError(f"{path}: unsupported file type {ext or '(none)'}; use json, jsonl(.gz), parquet or csv")
    return _BUILDERS[ext]


def load_rows(source: str | os.PathLike, *, split: str = "train", columns: list[str] | None = None):
    """A `datasets.Dataset` from a local file or folder (or a hub name when online).

    columns: required column names; a missing one is an error listing the columns that exist.
    Raises MinituneError with the path and the reason for unreadable or missing files.
    """
    import datasets

    datasets.disable_progress_bars()
    p = Path(source).expanduser()
    try:
        if p.is_file():
            ds = datasets.load_dataset(_builder(p), data_files=str(p), split="train")
        elif p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            if not files:
                raise MinituneError(f"{p}: empty folder")
            ds = datasets.load_dataset(_builder(files[0]), data_files=[str(f) for f in files], split="train")
        elif str(source).count("/") == 1 and not str(source).startswith((".", "/", "~")):
            ds = datasets.load_dataset(str(source), split=split)
        else:
            raise MinituneError(f"dataset path {source} does not exist")
    except MinituneError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the path and the reason
        raise MinituneError(f"cannot read dataset {source}: {type(e).__name__}: {str(e)[:300]}") from None
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
