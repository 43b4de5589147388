"""Curves from a run's metrics.jsonl, as a PNG (needs matplotlib: `pip install minitune[plot]`).

    python -m minitune.plot outputs/ppo                        # -> outputs/ppo/curves.png
    python -m minitune.plot outputs/ppo outputs/grpo --out ppo_vs_grpo.png   # runs overlaid
    python -m minitune.plot outputs/ppo outputs/grpo --x minutes   # against wall-clock minutes, not steps

One panel per kind of metric that the run logged: training loss, held-out loss, accuracy and
exact-match (per family too), reward/score, KL, throughput. Held-out values at the first and last
logged step are marked and labelled, so before/after reads off the picture.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path

from minitune.errors import MinituneError

# (panel title, predicate on a metric name) in display order; a metric goes to the first match.
PANELS = [
    ("training loss", lambda k: k in ("loss", "pg_loss", "vf_loss")),
    ("held-out loss", lambda k: k == "eval_loss"),
    ("accuracy / exact match", lambda k: k in ("accuracy", "eval_accuracy") or k.startswith("eval_exact_match")),
    ("held-out prompts gained / lost since step 0", lambda k: k in ("eval_gained", "eval_lost")),
    ("reward", lambda k: k in ("score_mean", "eval_reward_mean", "rewards_chosen", "rewards_rejected", "margin",
                               "eval_margin", "eval_score_mean", "advantage_mean")),
    ("KL to the reference (nats)", lambda k: k in ("kl", "eval_kl", "approx_kl")),
    ("throughput", lambda k: k in ("tokens_per_s", "pairs_per_s", "gen_tokens_per_s")),
    ("response length / no-EOS share", lambda k: k in ("response_length", "no_eos_share", "eval_response_length",
                                                       "eval_no_eos_share", "stop_share", "eval_stop_share")),
]


X_AXES = ("step", "minutes")


def read_metrics(path: str | Path, x: str = "step") -> tuple[str, dict[str, list[tuple[float, float]]]]:
    """(run name, {metric: [(x, value), ...]}) from a run folder or its metrics.jsonl; x is the step, or
    with x="minutes" the wall-clock minutes since the file's first row (to compare runs on a time budget)."""
    if x not in X_AXES:
        raise MinituneError(f"--x {x}: use one of {', '.join(X_AXES)}")
    p = Path(path)
    f = p / "metrics.jsonl" if p.is_dir() else p
    if not f.is_file():
        raise MinituneError(f"no metrics.jsonl at {path}; pass a run's output_dir or its metrics.jsonl")
    series: dict[str, list[tuple[int, float, float]]] = {}  # metric -> [(step, time, value)]
    summaries, t0 = [], None
    for n, line in enumerate(f.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise MinituneError(f"{f}:{n} is not a JSON line") from None
        step, t = row.get("step"), row.get("time")
        if x == "minutes" and not _number(t):
            raise MinituneError(f"{f}:{n} has no time; --x minutes needs the time every minitune run logs")
        t0 = t if t0 is None else t0
        if "final_step" in row:
            summaries.append(row)
            continue
        if not isinstance(step, int):
            continue
        for k, v in row.items():
            if k not in ("step", "time") and _number(v):
                series.setdefault(k, []).append((step, t, float(v)))
    # The closing summary holds the final evaluation (e.g. SFT's eval_loss, accuracy_after): it
    # extends the series logged during the run, without repeating a point already there.
    for row in summaries:
        step = row["final_step"]
        for k, v in row.items():
            if k.endswith("_before") or not _number(v):
                continue
            key = k.removesuffix("_after")
            pts = series.get(key)
            if pts and all(s != step for s, _, _ in pts):
                pts.append((step, row.get("time"), float(v)))
    name = (f.parent if f.name == "metrics.jsonl" else f).name
    if x == "step":
        return name, {k: [(s, v) for s, _, v in pts] for k, pts in series.items()}
    return name, {k: [((t - t0) / 60, v) for _, t, v in pts] for k, pts in series.items()}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def panels_for(runs: list[tuple[str, dict]], metrics: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """[(panel title, metric names)] for the metrics the runs logged (only `metrics` when given)."""
    keys = sorted({k for _, s in runs for k in s})
    if metrics:
        missing = [m for m in metrics if m not in keys]
        if missing:
            raise MinituneError(f"--metrics {','.join(missing)}: not logged by these runs; they log {', '.join(keys)}")
        keys = [k for k in keys if k in metrics]
    out = []
    for title, match in PANELS:
        ks = [k for k in keys if match(k)]
        if ks:
            out.append((title, ks))
    return out


LINE_STYLES = ["-", "--", ":", "-."]


def plot(paths: list[str | Path], out: str | Path | None = None, metrics: list[str] | None = None,
         x: str = "step") -> Path:
    """Writes the PNG (only the named `metrics` when given; against steps, or with x="minutes" against
    wall-clock minutes since each run's first logged row) and returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MinituneError("plotting needs matplotlib: pip install 'minitune[plot]'") from None
    runs = [read_metrics(p, x) for p in paths]
    panels = panels_for(runs, metrics)
    if not panels:
        raise MinituneError(f"nothing to plot in {', '.join(map(str, paths))}: no loss, eval, reward or KL metric")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        starts = set()  # runs that start from the same figure get one "before" label, not a pile of them
        for r, (run, series) in enumerate(runs):
            for j, k in enumerate(k for k in keys if series.get(k)):
                pts = series[k]
                label = k if len(runs) == 1 else f"{run}: {k}"
                # one colour per run in every panel when runs are compared (metrics told apart by line style)
                color, style = (f"C{j}", "-") if len(runs) == 1 else (f"C{r % 10}", LINE_STYLES[j % len(LINE_STYLES)])
                xs, ys = zip(*pts)
                held_out = k.startswith("eval_") or (k == "accuracy" and len(pts) <= 3)
                line, = ax.plot(xs, ys, linestyle=style, marker="o" if held_out or len(pts) < 20 else None,
                                markersize=3, color=color, label=label)
                if held_out and len(pts) >= 2:
                    for (px, py), tag in ((pts[0], "before"), (pts[-1], "after")):
                        if tag == "before":
                            if f"{py:.3g}" in starts:
                                continue
                            starts.add(f"{py:.3g}")
                        ax.annotate(f"{tag} {py:.3g}", (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                    color=line.get_color())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step" if x == "step" else "minutes since the run's first logged row")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, framealpha=0.5)  # lines behind the legend stay visible
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    # wrapped to the figure's width (~10 characters an inch at this size): many runs' names otherwise run off it
    fig.suptitle(textwrap.fill(" vs ".join(r for r, _ in runs), width=int(fig.get_size_inches()[0] * 10)), fontsize=11)
    fig.tight_layout()
    first = Path(paths[0])
    target = Path(out) if out else (first if first.is_dir() else first.parent) / "curves.png"
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minitune.plot", description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run output folders or metrics.jsonl files")
    ap.add_argument("--out", default=None, help="PNG path (default: curves.png in the first run's folder)")
    ap.add_argument("--metrics", default="", help="comma-separated metric names to draw, e.g. eval_exact_match,kl "
                    "(default: every metric with a panel)")
    ap.add_argument("--x", default="step", help="x axis: step (default) or minutes (wall clock since each run's "
                    "first logged row, to compare runs on the same time budget)")
    a = ap.parse_args(argv)
    try:
        path = plot(a.runs, a.out, [m for m in a.metrics.split(",") if m] or None, a.x)
    except MinituneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
