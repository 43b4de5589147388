"""Shared by the benchmarks: run a measurement in a fresh process (clean peak RSS), print and save
tables. Results go to benchmarks/results/<name>.json and .md."""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def packed_blocks(batch: int, seq: int, n: int, seed: int = 0, vocab: int = 32000) -> list[dict]:
    """n batches of {input_ids, position_ids, labels} [batch, seq] as SFT trains on them: random
    documents of 64-700 tokens packed by `ConstantLengthDataset` (positions restart per document)."""
    import torch

    from minitune.data import ConstantLengthDataset, Document

    g = torch.Generator().manual_seed(seed)

    def documents(rows):
        return [Document(r, [True] * len(r)) for r in rows], 0

    docs = [torch.randint(3, vocab, (int(torch.randint(64, 701, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n * batch * seq // 300 + 16)]
    blocks = iter(ConstantLengthDataset(docs, documents, seq_length=seq, shard=(0, 1)))
    return [{k: torch.stack([b[k] for b in chunk]) for k in ("input_ids", "position_ids", "labels")}
            for chunk in ([next(blocks) for _ in range(batch)] for _ in range(n))]


def run_worker(script: Path, args: list[str], timeout: int = 3600, env: dict | None = None) -> dict:
    """Runs `python script --worker ...args` (with `env` added to the environment) and returns the
    JSON it prints last."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    res = subprocess.run([sys.executable, str(script), "--worker", *args], capture_output=True, text=True,
                         timeout=timeout, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"worker failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC ...", "Intel(R) Xeon(R) ...") where Linux says it: CPU figures are
    only comparable on the same model."""
    from minitune.cpu_linear import cpu_info

    return cpu_info("model name") or platform.processor() or platform.machine()


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
        return f"CPU {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}"
    except ImportError:  # pragma: no cover
        return platform.platform()


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def save(name: str, rows: list[dict], columns: list[str], command: str, out_dir: Path | None = None) -> str:
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    header = f"{datetime.date.today().isoformat()} · {machine()} · `{command}`"
    table = markdown_table(rows, columns)
    (out / f"{name}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    (out / f"{name}.md").write_text(header + "\n\n" + table + "\n")
    print(header + "\n\n" + table)
    return table
