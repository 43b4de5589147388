"""Bad input found by a new user's battery: each gives one clear line naming the problem and the fix,
with nothing partial written, or behaves as stated (no hang, no NaN checkpoint named "last good")."""
import gzip
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minitune import MinituneError
from minitune.checkpoint import iter_safetensors
from minitune.data import ConstantLengthDataset, load_rows, make_formatter
from minitune.train.config import parse_cli
from minitune.train.metrics import read_metrics
from minitune.train.control import StopRequested, StopSignal
from helpers import load_recipe, tiny_with_real_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sft = load_recipe("lora_sft")


@pytest.fixture(scope="module")
def tiny(demo_dir, tmp_path_factory):
    return tiny_with_real_tokenizer(tmp_path_factory.mktemp("tiny") / "m", demo_dir)


def sft_args(tiny, out, **extra):
    args = {"model.path": str(tiny), "run.output_dir": str(out), "run.progress": "false", "run.max_steps": 4,
            "run.batch_size": 2, "data.seq_length": 32, "lora.r": 4, "optim.lr": 1e-2, "run.save_every": 1,
            "run.keep_last": 50, "eval.accuracy": "false", "data.synthetic_train": 100, "data.synthetic_eval": 8}
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def one_line_error(capsys, argv) -> str:
    """Runs the SFT recipe's command-line entry; returns its single stderr line (exit code 2)."""
    assert sft.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- config ------------------------------------------------------------------------------------


def test_out_of_range_optimizer_values_fail_at_config_time(capsys, tmp_path):
    err = one_line_error(capsys, ["optim.lr=-0.001", f"run.output_dir={tmp_path / 'o'}"])
    assert "optim.lr=-0.001 must be >= 0" in err
    assert not (tmp_path / "o").exists()  # nothing written
    for arg, msg in [("optim.betas=[0.9]", "optim.betas=[0.9] must be two numbers"),
                     ("optim.eps=0", "optim.eps=0.0 must be > 0"), ("optim.grad_clip=-1", "optim.grad_clip"),
                     ("run.batch_size=0", "run.batch_size=0 must be >= 1"), ("lora.dropout=1.5", "lora.dropout"),
                     ("data.seq_length=1", "data.seq_length=1 must be >= 2"),
                     ("data.hh_chat=true", "data.hh_chat=True renders hh-rlhf dialogues")]:
        with pytest.raises(MinituneError, match=re.escape(msg)):
            parse_cli(sft.SFTConfig, [arg])
    parse_cli(sft.SFTConfig, ["optim.lr=0"])  # lr 0 is legal: the learning tests' control


def test_yaml_syntax_error_names_file_line_and_column(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: demo\n lora:\n  r: 8\n")
    err = one_line_error(capsys, ["--config", str(bad)])
    assert f"{bad}:3:2: invalid YAML" in err
    with pytest.raises(MinituneError, match="override 'lora.r=\\[1': the value is not valid YAML"):
        parse_cli(sft.SFTConfig, ["lora.r=[1"])


# -- templates and files -----------------------------------------------------------------------


def test_chat_template_with_an_undefined_variable_raises(demo_tok):
    import copy

    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    tok = copy.copy(demo_tok)  # the session's tokenizer keeps its template
    tok.chat_template = "{% for m in messages %}{{ speaker_tag }}: {{ m.content }}\n{% endfor %}"
    with pytest.raises(MinituneError, match="undefined variable \\('speaker_tag' is undefined\\)"):
        tok.apply_chat_template(msgs)
    # what templates legitimately test stays usable: passed names, missing message keys, `is defined`
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m.content }}{% if m.tool_calls %}T{% endif %}"
                         "{{ m.name }}{% endfor %}{% if tools %}X{% endif %}{% if documents %}D{% endif %}"
                         "{% if custom is defined %}C{% endif %}{% if add_generation_prompt %}>{% endif %}")
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == (demo_tok.bos_token or "") + "hiyo>"
    assert tok.apply_chat_template(msgs, custom=1) == (demo_tok.bos_token or "") + "hiyoC"


def test_empty_file_is_named(tmp_path, capsys, tiny):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(MinituneError, match="empty.jsonl: the file is empty"):
        load_rows(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(MinituneError, match="blank.jsonl: the file is empty"):
        load_rows(tmp_path / "blank.jsonl")
    with gzip.open(tmp_path / "empty.jsonl.gz", "wt") as f:
        f.write("")
    with pytest.raises(MinituneError, match="empty.jsonl.gz: the file is empty"):
        load_rows(tmp_path / "empty.jsonl.gz")
    err = one_line_error(capsys, sft_args(tiny, tmp_path / "o", **{"data.source": tmp_path / "empty.jsonl",
                                                                   "data.template": "text"}))
    assert "the file is empty" in err


def test_non_utf8_bytes_are_named_with_file_and_line_at_load_time(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(MinituneError, match=r"latin1.jsonl: line 2 is not valid UTF-8 \(byte 0xe9 at column 14\)"):
        load_rows(path)


def test_broken_jsonl_line_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c", oops}\n')
    with pytest.raises(MinituneError, match=r"broken.jsonl: line 3 is not valid JSON"):
        load_rows(path)
    path.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(MinituneError, match=r"line 2 is a JSON list, not an object"):
        load_rows(path)


# -- data that yields nothing, signals while data is produced ----------------------------------


def test_endless_stream_over_empty_texts_stops_with_the_column_and_count(demo_tok):
    rows = [{"text": ""}, {"text": "   "}, {"text": "\n"}]
    ds = ConstantLengthDataset(rows, make_formatter("text", demo_tok), seq_length=8, infinite=True, shard=(0, 1))
    old = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("the stream spins")))
    signal.alarm(30)
    try:
        with pytest.raises(MinituneError, match=r"no tokens: all 3 rows read were empty .* in column 'text'"):
            next(iter(ds))
        with pytest.raises(MinituneError, match="reader 3 of 4 .* received no rows"):
            next(iter(ConstantLengthDataset(rows, make_formatter("text", demo_tok), seq_length=8, infinite=True,
                                            shard=(3, 4))))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_recipe_on_all_empty_texts_errors_instead_of_spinning(tiny, tmp_path):
    data = jsonl(tmp_path / "empty_texts.jsonl", [{"text": " "}] * 20)
    args = sft_args(tiny, tmp_path / "o", **{"data.source": data, "data.template": "text"})
    res = subprocess.run([sys.executable, str(ROOT / "recipes" / "lora_sft.py"), *args], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "no tokens: all 19 rows read were empty or whitespace-only in column 'text'" in res.stderr
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_stop_signal_interrupts_a_wait_for_data():
    with StopSignal() as stop:
        with pytest.raises(StopRequested):
            with stop.interruptible():
                os.kill(os.getpid(), signal.SIGTERM)
                while True:  # a data producer that would never return
                    pass
        assert stop.requested == "SIGTERM"


def test_sigterm_while_data_is_produced_saves_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    args = sft_args(tiny, tmp_path / "full", **{"run.max_steps": 5})
    sft.train(parse_cli(sft.SFTConfig, args))
    full = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r]

    real, calls = sft.batches, []

    def stalling(it, n, device):
        calls.append(1)
        if len(calls) == 3:  # the fetch for step 3: one block comes, then the data stalls forever
            real(it, 1, device)
            os.kill(os.getpid(), signal.SIGTERM)
            while True:
                pass
        return real(it, n, device)

    monkeypatch.setattr(sft, "batches", stalling)
    out = sft.train(parse_cli(sft.SFTConfig, sft_args(tiny, tmp_path / "stopped", **{"run.max_steps": 5})))
    assert out["final_step"] == 2
    monkeypatch.setattr(sft, "batches", real)
    sft.train(parse_cli(sft.SFTConfig, sft_args(tiny, tmp_path / "stopped", **{"run.max_steps": 5,
                                                                               "run.resume": "true"})))
    resumed = [r["loss"] for r in read_metrics(tmp_path / "stopped" / "metrics.jsonl") if "loss" in r]
    assert resumed == pytest.approx(full, abs=1e-6)  # steps 1-2, then 3-5 after the resume


# -- long documents ----------------------------------------------------------------------------


def test_packing_stats_are_printed_and_saved(tiny, tmp_path, capsys):
    data = jsonl(tmp_path / "docs.jsonl", [{"text": "word " * 200}] + [{"text": "short one"}] * 30 + [{"text": ""}])
    sft.train(parse_cli(sft.SFTConfig, sft_args(tiny, tmp_path / "o", **{"data.source": data, "data.template": "text",
                                                                           "run.max_steps": 1, "data.holdout": 2})))
    stats = json.loads((tmp_path / "o" / "data_stats.json").read_text())
    assert stats["split_documents"] >= 1 and stats["documents"] >= 28 and stats["tokens"] > 200
    assert stats["rows"] == stats["documents"] + stats["skipped_empty"]
    printed = capsys.readouterr().out
    assert f"{stats['split_documents']} longer than seq_length split across blocks (none truncated)" in printed


# -- NaN safety --------------------------------------------------------------------------------


def test_non_finite_step_is_never_taken_nor_saved(tiny, tmp_path):
    out = tmp_path / "nan"
    args = sft_args(tiny, out, **{"optim.lr": 1e12, "optim.grad_clip": 1e12, "optim.warmup_steps": 0,
                                  "run.max_steps": 50})
    with pytest.raises(MinituneError, match=r"(loss|gradient norm) is (nan|inf).* at step (\d+): stopping before the "
                                            r"optimizer step; the last good checkpoint is .*step_"):
        sft.train(parse_cli(sft.SFTConfig, args))
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert ckpts
    for c in ckpts:  # every checkpoint on disk is finite, so the newest is the last good one
        assert all(torch.isfinite(t).all() for _, t in iter_safetensors(c / "adapter" / "adapter_model.safetensors"))
    # the newest checkpoint gives finite logits (resuming from it no longer starts at NaN)
    from minitune import load_model
    from minitune.lora import LoRAConfig, apply_lora
    from minitune.train.setup import restore_adapter

    model = load_model(tiny)
    apply_lora(model, LoRAConfig(r=4, alpha=32, target_modules="all-linear"))
    restore_adapter(model, ckpts[-1], "default")
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 1000, (1, 16))).logits).all()
    # and a checkpoint with NaN weights (written by anything else) is refused by name
    from safetensors.torch import save_file

    bad = sorted((out / "checkpoints").glob("step_*"))[-1]
    f = bad / "adapter" / "adapter_model.safetensors"
    sd = dict(iter_safetensors(f))
    first = sorted(sd)[0]
    sd[first] = torch.full_like(sd[first], float("nan"))
    save_file(sd, str(f))
    with pytest.raises(MinituneError, match="holds NaN/inf weights"):
        sft.train(parse_cli(sft.SFTConfig, sft_args(tiny, out, **{"run.resume": str(bad), "run.max_steps": 20})))


def test_save_refuses_non_finite_adapter(tiny, tmp_path):
    from minitune import load_model
    from minitune.distributed import DistInfo
    from minitune.lora import LoRAConfig, apply_lora, lora_layers
    from minitune.train.checkpointing import CheckpointManager
    from minitune.train.setup import save_state

    model = load_model(tiny)
    apply_lora(model, LoRAConfig(r=2))
    _, layer = next(iter(lora_layers(model)))
    with torch.no_grad():
        layer.adapters["default"].lora_B.fill_(float("inf"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(MinituneError, match="not saving step 3: 1 adapter tensor\\(s\\) hold NaN/inf"):
        save_state(mgr, 3, model, adapter="default", optimizer=opt, scheduler=None, data_state={},
                   info=DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    assert mgr.all() == []


def test_fsdp_on_a_cpu_torch_without_it_is_refused_by_name(monkeypatch):
    """FSDP2 runs on CPU from torch 2.7; with an older torch a CPU run under torchrun stops before any model loads."""
    import minitune.distributed as dist_mod
    from minitune.distributed import DistInfo, check_parallel

    two_ranks = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    if dist_mod.fsdp_runs_on(torch.device("cpu")):  # this torch: refused only where FSDP2 cannot run
        check_parallel("fsdp", two_ranks)
    monkeypatch.setattr(dist_mod, "fsdp_runs_on", lambda device: device.type != "cpu")
    with pytest.raises(MinituneError, match=r"run.parallel=fsdp on CPU needs torch >= 2.7 .*use run.parallel=ddp"):
        check_parallel("fsdp", two_ranks)
    check_parallel("ddp", two_ranks)
    check_parallel("fsdp", DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


# -- preference pairs --------------------------------------------------------------------------


def test_reward_data_with_every_pair_skipped_says_why(tiny, tmp_path):
    rec = load_recipe("reward_model")
    data = jsonl(tmp_path / "same.jsonl", [{"chosen": f"answer {i}", "rejected": f"answer {i}"} for i in range(20)])
    args = [f"model.path={tiny}", f"data.source={data}", f"run.output_dir={tmp_path / 'o'}", "data.holdout=2",
            "run.progress=false"]
    with pytest.raises(MinituneError, match=r"every training pair was skipped \(pairs: kept 0; .* 20 with chosen == "
                                            r"rejected"):
        rec.train(parse_cli(rec.RewardConfig, args))
