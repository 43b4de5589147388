"""Metrics: always appended to `metrics.jsonl` in the output folder; also to wandb when enabled."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from minitune.train.sections import WandbSection


class MetricsLogger:
    """`log(step, **values)` on rank 0; other ranks get a logger that does nothing."""

    def __init__(self, out_dir: Path, wandb_cfg: WandbSection, config: dict, *, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._wandb = None
        if enabled and wandb_cfg.enabled:
            import wandb

            os.environ.setdefault("WANDB_MODE", wandb_cfg.mode)  # an explicit WANDB_MODE wins
            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(project=wandb_cfg.project, name=wandb_cfg.name or None, config=config,
                                     dir=str(out_dir))

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
