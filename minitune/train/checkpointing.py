"""Training checkpoints: written into a temporary folder and renamed into place, so a crash or
Ctrl-C mid-write leaves the last good checkpoint intact; the last `keep_last` are kept.

Layout of `<output_dir>/checkpoints/step_00000012/`:
  adapter/            PEFT-format adapter (plus head tensors for reward/value heads)
  common.pt           step, scheduler, recipe extras (rank 0)
  rank{r}.pt          optimizer state (local shard under FSDP), data iterator and RNG states of rank r
All `.pt` files hold tensors and plain Python values only and are read with `weights_only=True`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from minitune.errors import MinituneError

PREFIX = "step_"


class CheckpointManager:
    def __init__(self, output_dir: Path, keep_last: int = 2):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = max(1, keep_last)

    def all(self) -> list[Path]:
        if not self.root.exists():
            return []
        done = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(".tmp")
                and (p / "common.pt").exists()]
        return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def tmp_dir(self, step: int) -> Path:
        return self.root / f"{PREFIX}{step:08d}.tmp"

    def save(self, step: int, write: Callable[[Path], None], *, rank: int = 0, barrier: Callable[[], None] = lambda: None) -> Path:
        """Every rank calls this; `write(tmp)` writes that rank's files; rank 0 publishes atomically."""
        tmp, final = self.tmp_dir(step), self.root / f"{PREFIX}{step:08d}"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        write(tmp)
        barrier()
        if rank == 0:
            if final.exists():
                old = final.with_name(final.name + ".old")
                os.replace(final, old)
                shutil.rmtree(old)
            os.replace(tmp, final)
            for p in self.all()[: -self.keep_last]:
                shutil.rmtree(p, ignore_errors=True)
        barrier()
        return final


def is_fresh(resume: str) -> bool:
    return resume.lower() in ("false", "no", "0", "")


def resume_path(output_dir: Path, resume: str) -> Path | None:
    """Read-only: the checkpoint that `run.resume` names (None for a fresh run)."""
    if is_fresh(resume):
        return None
    if resume.lower() in ("true", "yes", "1", "latest"):
        latest = CheckpointManager(output_dir).latest()
        if latest is None:
            raise MinituneError(f"run.resume=true but {Path(output_dir) / 'checkpoints'} has no checkpoint")
        return latest
    path = Path(resume)
    if not (path / "common.pt").exists():
        raise MinituneError(f"run.resume={resume}: not a checkpoint folder (no common.pt)")
    return path


def resolve_resume(output_dir: Path, resume: str, overwrite: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run. Refuses (before any compute) an output
    folder that holds another run's checkpoints unless resume or overwrite is set; with overwrite the
    old checkpoints and metrics are removed."""
    mgr = CheckpointManager(output_dir)
    if is_fresh(resume):
        if mgr.all() and not overwrite:
            raise MinituneError(
                f"{output_dir} already holds checkpoints ({mgr.latest().name}); set run.resume=true to continue "
                "that run or run.overwrite=true to start over"
            )
        if overwrite:
            shutil.rmtree(mgr.root, ignore_errors=True)
            (Path(output_dir) / "metrics.jsonl").unlink(missing_ok=True)
        return None
    return resume_path(output_dir, resume)


def save_pt(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_pt(path: Path):
    if not path.exists():
        raise MinituneError(f"{path} is missing: the checkpoint is incomplete or was written by another world size")
    return torch.load(path, map_location="cpu", weights_only=True)


def local_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """The optimizer state with DTensors (FSDP) turned into their local shards."""
    sd = opt.state_dict()
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return sd
    conv = lambda v: v.to_local() if isinstance(v, DTensor) else v  # noqa: E731
    sd["state"] = {k: {n: conv(v) for n, v in s.items()} for k, s in sd["state"].items()}
    return sd


def load_optimizer_state(opt: torch.optim.Optimizer, sd: dict) -> None:
    """Loads a state saved by `local_optimizer_state`, re-wrapping shards as DTensors where the
    parameters are DTensors."""
    opt.load_state_dict(sd)
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return
    for group in opt.param_groups:
        for p in group["params"]:
            if isinstance(p, DTensor):
                st = opt.state.get(p, {})
                for k, v in list(st.items()):
                    if torch.is_tensor(v) and not isinstance(v, DTensor) and v.dim() > 0:
                        st[k] = DTensor.from_local(v.to(p.to_local().device), p.device_mesh, p.placements)
