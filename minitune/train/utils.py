"""Plain helpers the training loops call: optimizer and schedule, the loss, RNG state, stop signals."""
from __future__ import annotations

import contextlib
import math
import random
import signal
from typing import Iterable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minitune.data.packing import IGNORE
from minitune.errors import MinituneError
from minitune.train.sections import OptimSection, Optimizer, Schedule


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimSection) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise MinituneError("no trainable parameters (did apply_lora run?)")
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == Optimizer.ADAMW:
        return torch.optim.AdamW(params, **kw)
    import bitsandbytes as bnb

    cls = {Optimizer.ADAMW_8BIT: bnb.optim.AdamW8bit, Optimizer.PAGED_ADAMW: bnb.optim.PagedAdamW,
           Optimizer.PAGED_ADAMW_8BIT: bnb.optim.PagedAdamW8bit}[cfg.name]
    return cls(params, **kw)


def lr_lambda(cfg: OptimSection, total_steps: int):
    """Multiplier of the base lr at optimizer step s: linear warmup, then cosine/linear/constant."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(cfg.warmup_steps, 1)
        if cfg.schedule == Schedule.CONSTANT:
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == Schedule.COSINE else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay
    return f


def _ce_sum(h: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    logits = head(h).float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")


def cross_entropy_sum(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk: int = 0) -> torch.Tensor:
    """Summed next-token cross-entropy over labels != -100 (labels already aligned with `hidden`).

    With chunk > 0 the sequence is processed `chunk` positions at a time and each chunk's fp32
    logits are recomputed in the backward pass, so full [B, T, V] fp32 logits never exist at once.
    """
    if chunk <= 0 or hidden.shape[1] <= chunk:
        return _ce_sum(hidden, labels, head)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[1], chunk):
        h, y = hidden[:, s: s + chunk], labels[:, s: s + chunk]
        total = total + (checkpoint(_ce_sum, h, y, head, use_reentrant=False) if torch.is_grad_enabled() else _ce_sum(h, y, head))
    return total


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(_flatten(random.getstate()))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, *rest = state["python"]
    random.setstate((version, tuple(rest[:-1]), rest[-1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flatten(py_state):
    version, internal, gauss = py_state
    return [version, *internal, gauss]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class StopRequested(Exception):
    """Raised inside `StopSignal.interruptible()` when SIGTERM/SIGINT arrives there."""


class StopSignal:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step (save, then exit).

    Inside `interruptible()` (waits with no step to finish, such as producing the next batch) the
    signal raises StopRequested at once, so no input can keep a run from stopping.
    """

    def __init__(self):
        self.requested: str | None = None
        self._old = {}
        self._interruptible = False

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if self._interruptible:
            raise StopRequested(self.requested)

    @contextlib.contextmanager
    def interruptible(self):
        self._interruptible = True
        try:
            if self.requested is not None:
                raise StopRequested(self.requested)
            yield
        finally:
            self._interruptible = False

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def check_finite(step: int, last_checkpoint, **values: float) -> None:
    """Call before `optimizer.step()` with the step's loss and gradient norm: a non-finite value
    stops the run before it corrupts the weights, naming the value, the step and the last good
    checkpoint (checkpoints are only written with finite weights, see `save_state`)."""
    bad = [f"{name.replace('_', ' ')} is {v}" for name, v in values.items() if not math.isfinite(v)]
    if bad:
        where = (f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint
                 else "; no checkpoint was saved yet")
        raise MinituneError(f"{' and '.join(bad)} at step {step}: stopping before the optimizer step{where}. "
                            "Lower optim.lr or optim.grad_clip, or check the data")
