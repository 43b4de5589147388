"""Smoke test of the benchmark on CPU: it runs and writes a table with the expected columns
(timings are measured in benchmarks/, never asserted in tests)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.slow


def test_memory_benchmark_writes_its_table(tmp_path):
    import memory

    memory.main(["--model", "tiny", "--mode", "qlora", "--seq", "16", "--batch", "1", "--steps", "1", "--warmup", "0",
                 "--compare-hf", "--out", str(tmp_path), "--name", "smoke",
                 "--path", str(memory.make_checkpoint("tiny", tmp_path / "ckpt", "float32"))])
    table = (tmp_path / "smoke.md").read_text()
    header = table.splitlines()[2]
    for col in ("library", "tokens/s", "peak GiB", "predicted GiB", "pred/meas"):
        assert col in header
    rows = json.loads((tmp_path / "smoke.json").read_text())["rows"]
    assert [r["library"] for r in rows] == ["minitune", "transformers+peft", "minitune / HF"]
    assert all(r["tokens/s"] > 0 and r["peak GiB"] > 0 for r in rows)


def test_generation_benchmark_shape_mode_writes_its_table(tmp_path):
    import generation
    import memory

    rows = generation.main(["--shape", "tiny", "--lora", "--batch", "2", "3", "--prompt-len", "4", "--new", "3",
                            "--repeats", "1", "--device", "cpu", "--out", str(tmp_path), "--name", "gen",
                            "--path", str(memory.make_checkpoint("tiny", tmp_path / "ckpt", "float32"))])
    assert [(r["library"], r["batch"]) for r in rows] == [
        ("minitune", 2), ("minitune", 3), ("transformers+peft", 2), ("transformers+peft", 3),
        ("minitune / transformers+peft", 2), ("minitune / transformers+peft", 3)]
    assert all(r["tokens/s"] > 0 for r in rows)
    assert "ms/step" in (tmp_path / "gen.md").read_text()


def test_memory_benchmark_packed_mode_and_sequence_sweep(tmp_path):
    import memory

    ckpt = str(memory.make_checkpoint("tiny", tmp_path / "ckpt", "float32"))
    memory.main(["--model", "tiny", "--mode", "lora", "--seq", "1024", "--batch", "1", "--steps", "1", "--warmup", "0",
                 "--packed", "--compare-hf", "--out", str(tmp_path), "--name", "packed", "--path", ckpt])
    rows = json.loads((tmp_path / "packed.json").read_text())["rows"]
    assert rows[0]["packed"] is True and [r["library"] for r in rows] == ["minitune", "transformers+peft", "minitune / HF"]
    blocks = memory.make_batches(memory.argparse.Namespace(packed=True, batch=2, seq=1024), 1)[0]
    assert (blocks["position_ids"][:, 1:] < blocks["position_ids"][:, :-1]).any(1).all()  # documents restart in every block
    assert (blocks["labels"] == -100).any()  # the token after a document's end is not a target

    memory.main(["--model", "tiny", "--mode", "lora", "--seq", "16", "--batch", "1", "--seq-sweep", "--budget-gib", "100",
                 "--sweep-max", "64", "--out", str(tmp_path), "--name", "sweep", "--path", ckpt])
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [r["seq"] for r in rows[:-1]] == [16, 32, 64] and all(r["fits"] for r in rows[:-1])
    assert rows[-1]["seq"] == "longest under 100 GiB: 64"
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_reward_pairs_benchmark_writes_its_table(tmp_path, hh_rows):  # hh_rows: skips without ../shared/data
    import reward_pairs

    rows = reward_pairs.main(["--pairs", "16", "--batch", "8", "--max-length", "64", "--out-dir", str(tmp_path)])
    assert [(r["library"], r["layout"]) for r in rows] == [
        ("minitune", "shared prompt, packed"), ("minitune", "padded rows"), ("transformers+peft", "padded rows")]
    assert all(r["pairs/s"] > 0 and r["peak RSS GiB"] > 0 for r in rows)
    assert "pairs/s" in (tmp_path / "reward_pairs_hh_64_cpu.md").read_text()


def test_rl_headroom_benchmark_writes_its_table(tmp_path, demo_dir, capsys):
    import rl_headroom

    rows = rl_headroom.main(["--adapter", "", "--prompts", "8", "--samples", "2", "--batch", "8", "--out", str(tmp_path)])
    assert rows[-1]["family"] == "all" and rows[-1]["prompts"] == 8
    assert {r["family"] for r in rows[:-1]} <= {"add", "convert", "reverse", "sort"}
    for r in rows:  # every greedy-wrong prompt is either fixable or stuck
        assert r["fixable"] + r["stuck"] == pytest.approx(1 - r["greedy"])
    table = json.loads((tmp_path / "rl_headroom_synthetic_cpu.json").read_text())
    assert table["rows"] == rows and "the bare model" in table["header"]
    assert "stuck prompts" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no adapter_config.json there"):
        rl_headroom.main(["--adapter", str(tmp_path / "none"), "--out", str(tmp_path)])
