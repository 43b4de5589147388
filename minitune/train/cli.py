"""Running a recipe from the command line, and the loop's save/stop decisions."""
from __future__ import annotations

import sys
from typing import Callable

from minitune.errors import MinituneError
from minitune.train.config import parse_cli
from minitune.train.sections import RunSection


def run_recipe(config_cls, train: Callable, argv=None, parse: Callable | None = None) -> int:
    """Parses `[--config FILE] [key=value ...]` (or the argument list with `parse`, which returns a config_cls),
    trains, and turns a MinituneError into one line and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        train(parse(argv) if parse is not None else parse_cli(config_cls, argv))
    except MinituneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def should_save(run: RunSection, step: int, total_steps: int, stopping: bool) -> bool:
    return bool((run.save_every and step % run.save_every == 0) or stopping or step == total_steps)


def report_stop(signal_name: str, step: int, checkpoint, is_main: bool) -> None:
    if is_main:
        print(f"\nstopped by {signal_name} at step {step}; checkpoint saved to {checkpoint}")
