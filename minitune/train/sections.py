"""Config sections shared by the recipes. Each recipe's config is a dataclass made of these."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum

import torch

from minitune import cpu_linear
from minitune.attention import AttentionImpl
from minitune.data.formats import Template
from minitune.dtypes import as_dtype
from minitune.errors import MinituneError, require
from minitune.quant import QuantConfig


class Parallel(str, Enum):
    NONE = "none"
    DDP = "ddp"
    FSDP = "fsdp"


class Schedule(str, Enum):
    COSINE = "cosine"
    LINEAR = "linear"
    CONSTANT = "constant"


class Optimizer(str, Enum):
    ADAMW = "adamw"
    ADAMW_8BIT = "adamw8bit"
    PAGED_ADAMW = "paged_adamw"
    PAGED_ADAMW_8BIT = "paged_adamw8bit"


@dataclass
class ModelSection:
    """path: HF folder, .gguf file, hub id, or "demo" (the project's SmolLM2-135M-Instruct).
    quant: the library's QuantConfig, or none: `quant: nf4` (its defaults), or a mapping
    {quant_type, double_quant, compute_dtype, quant_storage, blocksize, int8_threshold, skip}."""

    path: str = "demo"
    dtype: str = "float32"  # weights and compute dtype of the non-quantized parts
    quant: QuantConfig | None = None
    gradient_checkpointing: bool = False
    autocast: bool = False  # bf16 autocast on GPU; fp32 master weights
    attention: AttentionImpl = AttentionImpl.AUTO  # packed blocks: auto (flex on CUDA; on CPU segments from 1024 tokens, else sdpa), sdpa, segments, flex
    compile: bool | None = None  # torch.compile of each decoder layer for training; None: on for CUDA, off on CPU
    offload_activations: bool = False  # with gradient checkpointing: each layer's kept input in CPU memory
    cpu_pack: bool | None = None  # oneDNN-packed weight copies for no-grad passes on CPU (minitune.cpu_linear); None: on for CPU

    @property
    def torch_dtype(self) -> torch.dtype:
        return as_dtype(self.dtype)

    def resolve(self, device: torch.device) -> list[str]:
        """Settles what depends on the device, before the config is printed and saved (the saved
        config is what ran). Returns notes on what changed."""
        notes = []
        if self.compile is None:
            self.compile = device.type == "cuda"
            notes.append(f"model.compile auto -> {str(self.compile).lower()} on {device.type}")
        if self.cpu_pack is None:
            self.cpu_pack = device.type == "cpu" and cpu_linear.available()
            notes.append(f"model.cpu_pack auto -> {str(self.cpu_pack).lower()} on {device.type}")
        elif self.cpu_pack and not (device.type == "cpu" and cpu_linear.available()):
            self.cpu_pack = False  # what runs: plain F.linear
            why = "it packs CPU weights only" if device.type != "cpu" else f"not with this torch ({torch.__version__})"
            notes.append(f"model.cpu_pack true -> false: oneDNN's packed linear does not run here: {why}")
        if self.offload_activations and not self.gradient_checkpointing:
            raise MinituneError("model.offload_activations offloads the layer inputs that gradient checkpointing "
                                "keeps; set model.gradient_checkpointing=true too")
        if self.quant is not None and self.quant.compute_dtype == "bfloat16" and device.type == "cpu":
            self.quant = dataclasses.replace(self.quant, compute_dtype="float32")
            notes.append("model.quant.compute_dtype bfloat16 -> float32 on CPU (bf16 matmuls there are slow and inexact)")
        return notes


@dataclass
class OptimSection:
    name: Optimizer = Optimizer.ADAMW
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Schedule = Schedule.COSINE
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self):
        require(0 <= self.lr < float("inf"), "lr", self.lr, "must be >= 0 and finite; use a learning rate such as 1e-4")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", list(self.betas),
                "must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        require(self.eps > 0, "eps", self.eps, "must be > 0, e.g. 1e-8")
        require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        require(self.grad_clip > 0, "grad_clip", self.grad_clip, "must be > 0 (a very large value disables clipping)")


@dataclass
class RunSection:
    output_dir: str = "outputs/run"
    max_steps: int = 0  # 0: derived from epochs
    epochs: float = 1.0
    batch_size: int = 4  # micro-batch per rank
    grad_accum: int = 1
    global_batch: int = 0  # 0: batch_size * grad_accum * world; else grad_accum is derived from it
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    resume: str = "false"  # "false", "true" (latest in output_dir) or a checkpoint path
    overwrite: bool = False
    device: str = "auto"
    parallel: Parallel = Parallel.NONE
    memory_check: bool = True  # refuse a run predicted not to fit
    progress: bool = True

    def __post_init__(self):
        for name in ("max_steps", "global_batch", "eval_every", "save_every"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0 (0 turns it off)")
        for name in ("batch_size", "grad_accum", "log_every", "keep_last"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.epochs > 0, "epochs", self.epochs, "must be > 0 (or set run.max_steps)")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class WandbSection:
    enabled: bool = False
    project: str = "minitune"
    name: str = ""
    mode: str = "offline"  # offline works with no account or network; WANDB_MODE overrides


class SyntheticRejected(str, Enum):
    ECHO = "echo"
    NEAR_MISS = "near_miss"
    OWN = "own"  # DPO only: the start adapter's own wrong samples (held-out pairs: near_miss)


@dataclass
class DataSection:
    """source: "synthetic" (the project's task), or a file/folder/hub dataset."""

    source: str = "synthetic"
    template: Template = Template.CHAT
    text_column: str = "text"
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    hh_format: bool = False  # rows hold hh-rlhf dialogues ("\n\nHuman: ...\n\nAssistant: ...")
    hh_chat: bool = False  # render hh dialogues with the tokenizer's chat template instead of their raw text
    seq_length: int = 256
    completion_only: bool = True
    holdout: float = 0.05  # fraction (< 1) or count of rows held out for eval (when eval_source is empty)
    eval_source: str = ""  # held-out rows from their own file, folder or hub id[:split] (every recipe)
    max_rows: int = 0  # 0: all
    shuffle_buffer: int = 16
    synthetic_train: int = 2000
    synthetic_eval: int = 100
    # the rejected side of synthetic preference pairs (reward model, DPO): echo (the input given back,
    # unchanged list or operand), near_miss (the right form, one slip: a digit, two neighbours, a factor)
    # or own (DPO: a wrong answer the start adapter samples; its held-out pairs are near_miss)
    synthetic_rejected: SyntheticRejected = SyntheticRejected.ECHO

    def __post_init__(self):
        require(self.seq_length >= 2, "seq_length", self.seq_length, "must be >= 2 tokens")
        require(self.holdout > 0, "holdout", self.holdout, "must be > 0: a fraction below 1 or a row count")
        require(self.hh_format or not self.hh_chat, "hh_chat", self.hh_chat,
                "renders hh-rlhf dialogues through the chat template: set data.hh_format=true as well")
        for name in ("max_rows", "shuffle_buffer"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        for name in ("synthetic_train", "synthetic_eval"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")


SFT_OUTPUT_DIR = "outputs/lora_sft"  # the SFT recipe's default output folder; RL recipes start from its adapter


@dataclass
class GenSection:
    """Sampling of rollouts (PPO, GRPO)."""

    min_new_tokens: int = 32  # response length drawn uniformly in [min, max] per rollout
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_prompt_length: int = 256
    compile: bool = False  # torch.compile the decode step (CUDA graphs on GPU); off: on this 2-core CPU it ran slower
    # strings that end an answer (it is cut before them), e.g. ["\n\n"] for raw "Human:/Assistant:" dialogues,
    # which a model otherwise continues with the next turn instead of an EOS
    stop: list[str] = field(default_factory=list)
    # with several answers per prompt, the first is the greedy one (temperature 0), decoded in the same batch as
    # the samples, which stay as without it: the answer a greedy evaluation scores is itself trained on, pushed
    # down where it is wrong and another answer is better (self-critical training's greedy answer, here a member
    # of the group rather than only its baseline). Greedy loops that sampling rarely shows get penalised too
    greedy_member: bool = False

    def __post_init__(self):
        require(1 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens", self.min_new_tokens,
                f"must be in [1, max_new_tokens={self.max_new_tokens}]")
        require(self.temperature >= 0, "temperature", self.temperature, "must be >= 0 (0: greedy)")
        require(self.top_k >= 0, "top_k", self.top_k, "must be >= 0 (0: off)")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        require(self.max_prompt_length >= 1, "max_prompt_length", self.max_prompt_length, "must be >= 1")
        require(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "must be a list of non-empty strings")

    @classmethod
    def synthetic(cls, temperature: float = 1.0, greedy_member: bool = False) -> "GenSection":
        """Sampling for the synthetic task: 32 new tokens (every answer fits with its EOS; sort and
        reverse need up to 23, and a correct answer cut off would be scored wrong), prompts <= 96."""
        return cls(min_new_tokens=32, max_new_tokens=32, temperature=temperature, max_prompt_length=96,
                   greedy_member=greedy_member)

    def greedy(self) -> "GenSection":
        """The same settings, decoded greedily to the full budget (the held-out checks)."""
        return dataclasses.replace(self, temperature=0.0, min_new_tokens=self.max_new_tokens, greedy_member=False)


@dataclass
class HeldOutSection:
    """The RL recipes' held-out check (minitune.rl_eval): the first `prompts` held-out prompts (0: no
    check) answered greedily, at most `max_new_tokens` new tokens each, at the start, every
    `run.eval_every` steps and at the end: exact-match on the synthetic task, else the reward's mean
    score. With `kl_prompts` > 0 the first kl_prompts of them (all, if fewer) also get one answer sampled as rollouts
    are (temperature, stop strings, `gen.max_new_tokens`) and the policy's KL to the reference is
    measured on those: a fixed set of prompts, where the per-step rollout KL comes from one small batch."""

    prompts: int = 200
    max_new_tokens: int = 32  # SFT's greedy evaluation budget too
    kl_prompts: int = 0

    def __post_init__(self):
        require(self.prompts >= 0, "prompts", self.prompts, "must be >= 0 (0: no held-out check)")
        require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")
        require(self.kl_prompts >= 0, "kl_prompts", self.kl_prompts, "must be >= 0 (0: no KL measurement)")


@dataclass
class RewardSource:
    """What scores a rollout: a Python function, or a reward adapter from recipes/reward_model.py."""

    function: str = "minitune.data.synthetic:correctness_reward"  # module:function(responses, references)
    adapter: str = ""  # a reward adapter folder (used instead of the function)
    missing_eos_penalty: float = 0.0  # subtracted from the score of an answer the token budget cut off (no EOS)
    # subtracted from the score of an empty answer (only whitespace before its EOS or stop string): a reward
    # model trained on dialogues can rate silence above any reply (hh-rlhf's did: an immediate EOS scored ~1.5,
    # one std above the average greedy answer), and the policy then learns to say nothing
    empty_penalty: float = 0.0

    def __post_init__(self):
        for name in ("missing_eos_penalty", "empty_penalty"):
            value = getattr(self, name)
            require(0 <= value < float("inf"), name, value, "must be >= 0 and finite (0: no penalty)")


def resolve_grad_accum(run: RunSection, world_size: int) -> int:
    """Micro-steps per optimizer step; raises when run.global_batch does not divide evenly."""
    if not run.global_batch:
        return run.grad_accum
    per_step = run.batch_size * world_size
    if run.global_batch % per_step:
        raise MinituneError(
            f"run.global_batch={run.global_batch} is not divisible by run.batch_size ({run.batch_size}) x world size "
            f"({world_size}) = {per_step}; pick a global batch that is a multiple of {per_step}"
        )
    return run.global_batch // per_step
