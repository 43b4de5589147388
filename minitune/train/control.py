"""Stopping a run safely: SIGTERM/SIGINT turned into a flag (or an exception where nothing is in
flight), and the finite check before every optimizer step."""
from __future__ import annotations

import contextlib
import math
import signal

from minitune.distributed import all_ranks, world_size
from minitune.errors import MinituneError


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

    def anywhere(self, device) -> str | None:
        """The stop request of any rank (one process: this one's), checked together after each step, so all
        ranks stop after the same step: one that stopped alone would leave the others waiting in the next
        step's collectives (and its checkpoint's). A rank that got no signal itself names the other rank's."""
        mine = self.requested  # read once: a signal arriving during the vote counts at the next step, on every rank
        if world_size() == 1 or all_ranks(mine is None, device):
            return mine
        return mine or "a signal to another rank"

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
