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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
