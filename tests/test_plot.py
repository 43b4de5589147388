"""The plot command turns metrics.jsonl into a PNG with one panel per kind of metric."""
import json

import pytest

from minitune.errors import MinituneError
from minitune.plot import main, panels_for, plot, read_metrics

pytest.importorskip("matplotlib")


def write_run(folder, rows):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def rl_run(folder):
    rows = [{"step": 0, "time": 1.0, "eval_exact_match": 0.63, "eval_exact_match_add": 0.55}]
    rows += [{"step": s, "time": 1.0 + s, "score_mean": 0.6 + 0.01 * s, "kl": 0.1 * s, "pg_loss": -0.1, "lr": 1e-5}
             for s in range(1, 9)]
    rows += [{"step": 8, "time": 10.0, "eval_exact_match": 0.65, "eval_exact_match_add": 0.60},
             {"step": 8, "time": 11.0, "final_step": 8, "eval_exact_match": 0.65}]
    return write_run(folder, rows)


def test_panels_follow_the_logged_metrics_and_the_summary_line_is_not_a_point(tmp_path):
    name, series = read_metrics(rl_run(tmp_path / "ppo"))
    assert name == "ppo"
    assert series["eval_exact_match"] == [(0, 0.63), (8, 0.65)]  # the closing summary is not a third point
    sft = write_run(tmp_path / "sft", [{"step": 0, "time": 0.0, "eval_loss": 1.39}, {"step": 0, "time": 0.0, "accuracy": 0.0},
                                       {"step": 1, "time": 1.0, "loss": 1.6},
                                       {"step": 1, "time": 2.0, "final_step": 1, "eval_loss": 0.3, "accuracy_before": 0.0,
                                        "accuracy_after": 0.6, "steps": 1}])
    _, s = read_metrics(sft)  # SFT logs its final evaluation only in the summary
    assert s["eval_loss"] == [(0, 1.39), (1, 0.3)] and s["accuracy"] == [(0, 0.0), (1, 0.6)] and "steps" not in s
    titles = [t for t, _ in panels_for([(name, series)])]
    assert titles == ["training loss", "accuracy / exact match", "reward", "KL to the reference (nats)"]


def test_plot_writes_a_png_for_one_run_and_for_runs_overlaid(tmp_path):
    one = plot([rl_run(tmp_path / "ppo")])
    assert one == tmp_path / "ppo" / "curves.png"
    assert one.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and one.stat().st_size > 10_000
    sft = write_run(tmp_path / "sft", [{"step": s, "time": s, "loss": 2.0 / s} for s in range(1, 30)])
    both = tmp_path / "both.png"
    assert main([str(tmp_path / "ppo"), str(sft / "metrics.jsonl"), "--out", str(both)]) == 0
    assert both.stat().st_size > 10_000


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(MinituneError, match="no metrics.jsonl at"):
        plot([tmp_path / "missing"])
    empty = write_run(tmp_path / "empty", [{"step": 1, "time": 1.0, "lr": 0.1}])
    with pytest.raises(MinituneError, match="nothing to plot"):
        plot([empty])
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    assert main([str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:1 is not a JSON line" in capsys.readouterr().err


def test_metrics_option_draws_only_the_named_metrics(tmp_path, capsys):
    runs = [read_metrics(rl_run(tmp_path / "ppo"))]
    assert panels_for(runs, ["eval_exact_match", "kl"]) == [("accuracy / exact match", ["eval_exact_match"]),
                                                             ("KL to the reference (nats)", ["kl"])]
    out = tmp_path / "only.png"
    assert main([str(tmp_path / "ppo"), "--metrics", "eval_exact_match", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(tmp_path / "ppo"), "--metrics", "eval_exact_match,nope"]) == 2
    assert "--metrics nope: not logged by these runs; they log" in capsys.readouterr().err


def test_overlaid_runs_keep_one_colour_each_in_every_panel(tmp_path, monkeypatch):
    """Comparing runs, a run is one colour in every panel and its metrics differ by line style; one
    run alone gets a colour per metric."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot([rl_run(tmp_path / "a"), rl_run(tmp_path / "b")], tmp_path / "ab.png")
    colours: dict[str, set] = {"a": set(), "b": set()}
    for ax in figures[0].axes:
        styles = {}
        for line in ax.get_lines():
            run, key = line.get_label().split(": ")
            colours[run].add(line.get_color())
            styles.setdefault(run, []).append(line.get_linestyle())
        assert all(len(set(s)) == len(s) for s in styles.values())  # a run's metrics in one panel: distinct styles
    assert len(colours["a"]) == 1 and len(colours["b"]) == 1 and colours["a"] != colours["b"]
    plot([rl_run(tmp_path / "c")], tmp_path / "c.png")
    exact = next(ax for ax in figures[1].axes if any("exact_match" in ln.get_label() for ln in ax.get_lines()))
    assert len({ln.get_color() for ln in exact.get_lines()}) == len(exact.get_lines()) > 1


def test_runs_that_start_alike_share_one_before_label(tmp_path, monkeypatch):
    """Three runs from the same start: one "before" label where there were three on top of each other; each
    run keeps its "after" label."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot([rl_run(tmp_path / n) for n in "abc"], tmp_path / "abc.png", metrics=["eval_exact_match"])
    texts = [t.get_text() for t in figures[0].axes[0].texts]
    assert texts.count("before 0.63") == 1 and texts.count("after 0.65") == 3


def test_a_long_title_of_many_runs_wraps_inside_the_figure(tmp_path, monkeypatch):
    """Five runs with long names: the title breaks into lines that each fit the figure's width (one line ran off
    both edges before), and every run's name stays in it."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    names = [f"greedy_member_variant_{i}_with_a_long_name" for i in range(5)]
    plot([rl_run(tmp_path / n) for n in names], tmp_path / "many.png")
    fig = figures[0]
    title = fig._suptitle
    lines = title.get_text().split("\n")
    assert len(lines) > 1 and all(n in title.get_text().replace("\n", " ") for n in names)
    fig.canvas.draw()
    box = title.get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width


def flat(points):
    return [v for p in points for v in p]


def test_minutes_axis_puts_runs_on_one_time_budget(tmp_path, capsys):
    """--x minutes: each point at the wall-clock minutes since its run's first row (the summary line's
    final evaluation at the summary's own time), so runs whose steps cost differently compare on time."""
    rl = rl_run(tmp_path / "ppo")  # rows at times 1 .. 11 s
    _, by_step = read_metrics(rl)
    _, by_time = read_metrics(rl, x="minutes")
    assert by_step["kl"][0] == (1, 0.1) and by_time["kl"][0] == pytest.approx((1 / 60, 0.1))
    assert flat(by_time["eval_exact_match"]) == pytest.approx([0.0, 0.63, 9 / 60, 0.65])
    sft = write_run(tmp_path / "sft", [{"step": 60, "time": 100.0, "eval_loss": 0.30},
                                       {"step": 61, "time": 103.0, "loss": 0.3},
                                       {"step": 61, "time": 160.0, "final_step": 61, "eval_loss": 0.2, "steps": 61}])
    _, s = read_metrics(sft, x="minutes")
    assert flat(s["eval_loss"]) == pytest.approx([0.0, 0.30, 1.0, 0.2]) and flat(s["loss"]) == pytest.approx([0.05, 0.3])
    out = tmp_path / "budget.png"
    assert main([str(rl), str(sft), "--x", "minutes", "--out", str(out)]) == 0 and out.stat().st_size > 10_000
    assert main([str(rl), "--x", "hours"]) == 2
    assert "--x hours: use one of step, minutes" in capsys.readouterr().err
    untimed = write_run(tmp_path / "untimed", [{"step": 1, "loss": 1.0}])
    with pytest.raises(MinituneError, match="has no time; --x minutes needs"):
        read_metrics(untimed, x="minutes")
