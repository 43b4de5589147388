"""Seeding, and the RNG state a checkpoint saves so that a resumed run draws what an uninterrupted one would."""
from __future__ import annotations

import random

import torch


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


def random_state(rng: random.Random) -> list:
    """A `random.Random`'s state as nested lists: plain values that a checkpoint read with
    `weights_only=True` gives back."""
    return _to_list(rng.getstate())


def set_random_state(rng: random.Random, state) -> None:
    """The inverse of `random_state` (also takes the tuples of `getstate()`): `setstate` wants tuples."""
    rng.setstate(_to_tuple(state))


def _to_list(x):
    return [_to_list(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (tuple, list)) else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
