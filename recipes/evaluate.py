"""Held-out evaluation of adapters side by side: the RL recipes' held-out check, run on its own.

    python recipes/evaluate.py                                            # the SFT default's adapter, synthetic task
    python recipes/evaluate.py adapters=outputs/lora_sft/adapter,outputs/grpo/adapter
    python recipes/evaluate.py --like outputs/grpo              # a run's start adapter vs its result, its prompts
    python recipes/evaluate.py --like outputs/grpo_bf16 model.dtype=float32   # a bf16 run re-scored in fp32
    python recipes/evaluate.py --like recipes/configs/ppo_hh_rlhf.yaml adapters=none,outputs/ppo_hh/adapter

Each adapter (a PEFT folder; "auto": the SFT default's, the base until there is one; "none": the base) answers the same held-out
prompts greedily, exactly as PPO and GRPO evaluate during training (`minitune.rl_eval.HeldOutEval`):
exact match per family on the synthetic task, elsewhere the reward's score (the reward adapter or
function). Every adapter after the first is compared with the first: prompts gained and lost (exact
match) or the score's change in units of the first's spread. `--like` takes a run's folder or any
recipe's config: its model, data, gen, reward and held_out sections and run.seed, so the prompts are
the ones that run held out, scored as it scored them (and, from a run folder, adapters = its start
and its result); the overrides after it change any of that. Answers go to
<output_dir>/<i>_<adapter name>/eval_samples/step_0.jsonl; the reports to summary.json.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from minitune.adapters import load_adapter
from minitune.distributed import unwrap
from minitune.errors import MinituneError, require
from minitune.lora import LoRAConfig, apply_lora, set_adapter
from minitune.reward import load_reward_adapter
from minitune.rl_eval import HeldOutEval, flips
from minitune.rollout import check_reward_adapter, load_prompts, resolve_reward_fn
from minitune.train.cli import run_recipe
from minitune.train.config import parse_cli
from minitune.train.sections import (DataSection, GenSection, HeldOutSection, ModelSection, RewardSource, RunSection,
                                     WandbSection)
from minitune.train.setup import build_base, finish_model, finish_run, resolve_init_adapter, start_run
from minitune.train.rng import seed_everything


@dataclass
class EvalConfig:
    model: ModelSection = field(default_factory=ModelSection)
    # The held-out prompts: by default the synthetic task's 200 that neither the SFT default nor the RL
    # defaults train on (the same split as theirs: data.synthetic_train/eval with run.seed).
    data: DataSection = field(default_factory=lambda: DataSection(synthetic_train=2000, synthetic_eval=200))
    gen: GenSection = field(default_factory=GenSection.synthetic)  # chat rendering, prompt length, KL sampling
    reward: RewardSource = field(default_factory=RewardSource)  # scores non-synthetic answers
    held_out: HeldOutSection = field(default_factory=HeldOutSection)
    adapters: list[str] = field(default_factory=lambda: ["auto"])  # PEFT folders; "auto": the SFT default's; "none": base
    run: RunSection = field(default_factory=lambda: RunSection(output_dir="outputs/evaluate"))
    wandb: WandbSection = field(default_factory=WandbSection)

    def __post_init__(self):
        require(len(self.adapters) >= 1, "adapters", self.adapters, "name at least one adapter folder ('none' = the base)")
        require(self.held_out.prompts >= 1, "held_out.prompts", self.held_out.prompts, "must be >= 1 to evaluate")


def label(i: int, path: Path | None) -> str:
    """The adapter's name on the model and its output folder: its place, then its run folder's name (a recipe's
    <output_dir>/adapter) or its own, reduced to letters, digits and _ (module names take no dots)."""
    name = "base" if path is None else (path.parent.name if path.name == "adapter" else path.name)
    return f"{i}_" + re.sub(r"\W", "_", name)


def evaluate(cfg: EvalConfig) -> dict:
    # 1. Every adapter checked before the model loads; the prompts split as the recipes split them.
    paths = [None if a in ("", "none") else resolve_init_adapter(a, cfg.model.path) for a in cfg.adapters]
    if any(a == "auto" and p is None for a, p in zip(cfg.adapters, paths)):
        print("note: adapters 'auto' is the SFT default's adapter (outputs/lora_sft/adapter), which does not exist yet "
              "(run `python recipes/lora_sft.py`): evaluating the bare base in its place")
    reward_fn = None if cfg.reward.adapter else resolve_reward_fn(cfg.reward.function)
    if cfg.reward.adapter:
        check_reward_adapter(cfg.data, cfg.reward.adapter)
    ctx = start_run(cfg)
    info, device, out_dir, _, tok, log, _ = ctx
    split = load_prompts(cfg.data, cfg.run.seed, tok)

    # 2. One base, each adapter loaded frozen under its own name (the base as an all-zero adapter).
    seed_everything(cfg.run.seed)
    base = build_base(cfg.model, device)
    names = [label(i, p) for i, p in enumerate(paths)]
    for name, path in zip(names, paths):
        if path is None:
            apply_lora(base, LoRAConfig(), name, trainable=False)  # B = 0: exactly the base; a reward adapter still works
        else:
            load_adapter(base, path, name, trainable=False)
    reward_head = load_reward_adapter(base, cfg.reward.adapter, "reward") if cfg.reward.adapter else None
    wrapped = finish_model(base, cfg.model, cfg.run, info)
    model = unwrap(wrapped)
    model.eval()

    # 3. The held-out check per adapter; each later one compared with the first.
    reports, rows = {}, {}
    for name in names:
        set_adapter(model, name)
        ev = HeldOutEval(model, tok, split, cfg, reward_head=reward_head, reward_fn=reward_fn, out_dir=out_dir / name,
                         log=_Silent(), is_main=info.is_main, device=device)
        reports[name] = ev(0, title=name)
        rows[name] = ev.rows[0]
    first = names[0]
    comparisons = {}
    for name in names[1:]:
        if ev.synthetic:
            c = flips([r["correct"] for r in rows[first]], [r["correct"] for r in rows[name]])
            c["exact_match_change"] = reports[name]["exact_match"] - reports[first]["exact_match"]
            line = (f"exact match {reports[first]['exact_match']:.3f} -> {reports[name]['exact_match']:.3f}: "
                    f"{c['gained']:.0f} prompts gained, {c['lost']:.0f} lost")
        else:
            std = reports[first]["score_std"]
            change = reports[name]["score_mean"] - reports[first]["score_mean"]
            c = {"score_change": change, "score_change_sigma": change / std if std > 0 else 0.0,
                 "improved": float(sum(b["score"] > a["score"] for a, b in zip(rows[first], rows[name]))),
                 "worsened": float(sum(b["score"] < a["score"] for a, b in zip(rows[first], rows[name])))}
            line = (f"score {reports[first]['score_mean']:.3f} -> {reports[name]['score_mean']:.3f} "
                    f"({c['score_change_sigma']:+.2f} std of the first); {c['improved']:.0f} prompts scored higher, "
                    f"{c['worsened']:.0f} lower")
        comparisons[name] = c
        if info.is_main:
            print(f"{name} vs {first}: {line}")
    for i, name in enumerate(names):  # metrics.jsonl: one row per adapter, "step" = its place in `adapters`
        log.log(i, adapter=name, **{f"eval_{k}": v for k, v in reports[name].items()}, **comparisons.get(name, {}))
    summary = {"adapters": {n: str(p or "") for n, p in zip(names, paths)}, "reports": reports,
               "compared_with": first, "comparisons": comparisons}
    finish_run(wrapped, ctx, summary, adapter=None, base_name=cfg.model.path, print_summary=False)
    return summary


class _Silent:
    """HeldOutEval's logger here: evaluate() logs each adapter's report itself, under the adapter's name."""

    def log(self, step: int, **values) -> None:
        pass


# What `--like` takes from another run's config: the sections that decide which prompts are held out, how
# they are rendered and answered, and how answers are scored.
LIKE_SECTIONS = ("model", "data", "gen", "reward", "held_out")


def like_run(source: str) -> dict:
    """EvalConfig fields from a run's output folder (its config.yaml) or any recipe's YAML config: its
    LIKE_SECTIONS and run.seed (the seed splits the prompts), and, for an RL run's folder, adapters = [the
    adapter it started from, the adapter it saved]."""
    path = Path(source)
    file = path / "config.yaml" if path.is_dir() else path
    if not file.exists():
        raise MinituneError(f"--like {source}: neither a run folder with a config.yaml nor a config file")
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, dict):
        raise MinituneError(f"--like {source}: {file} is not a mapping of config sections")
    out = {k: data[k] for k in LIKE_SECTIONS if k in data}
    if isinstance(data.get("run"), dict) and "seed" in data["run"]:
        out["run"] = {"seed": data["run"]["seed"]}
    if path.is_dir() and (path / "adapter" / "adapter_config.json").exists():
        start = data.get("init_adapter", "none")
        out["adapters"] = [start or "none", str(path / "adapter")]
    return out


def parse(argv: list[str]) -> EvalConfig:
    """`[--like RUN_DIR_OR_CONFIG] [--config FILE] [key=value ...]`: --like's sections first, then the
    evaluate config file, then the overrides (`parse_cli`)."""
    argv, base = list(argv), None
    if argv and argv[0] == "--like":
        if len(argv) < 2:
            raise MinituneError("--like needs a run folder or a config file")
        base, argv = like_run(argv[1]), argv[2:]
    return parse_cli(EvalConfig, argv, base=base)


def main(argv=None) -> int:
    return run_recipe(EvalConfig, evaluate, argv, parse=parse)


if __name__ == "__main__":
    sys.exit(main())
