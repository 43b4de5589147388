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
