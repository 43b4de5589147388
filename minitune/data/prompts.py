"""Prompts for the RL recipes: rendered with a template, tokenized, truncated with a count, left-padded."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from minitune.generate import left_pad
from minitune.tokenizer import Tokenizer


class PromptBatch(NamedTuple):
    """input_ids: [B, P] left-padded prompts. attention_mask: [B, P]. texts: the prompt strings.
    references: optional reference answers (rule-based rewards), one per prompt or None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    texts: list[str]
    references: list


def prompt_rendering(d, *, chat: bool) -> str:
    """A name for how a recipe's data section turns prompts into text: "synthetic" (the task's chat
    prompts), "hh-raw" / "hh-chat" (hh-rlhf dialogues as raw Human:/Assistant: text or through the
    chat template), "chat" / "text" (a prompt column with or without the chat template). A reward
    adapter records it (adapter/minitune.json); PPO and GRPO refuse one trained on another."""
    if d.source == "synthetic":
        return "synthetic"
    if d.hh_format:
        return "hh-chat" if d.hh_chat else "hh-raw"
    return "chat" if chat else "text"


def render_prompt(text: str, tok: Tokenizer, *, chat: bool, system: str | None = None) -> str:
    if not chat:
        return text
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tok.apply_chat_template(msgs, add_generation_prompt=True)


def encode_prompts(texts: Sequence[str], tok: Tokenizer, *, max_length: int, chat: bool = True,
                   system: str | None = None) -> tuple[list[list[int]], int]:
    """Token ids per prompt (keeping the last max_length tokens) and the number truncated."""
    rendered = [render_prompt(t, tok, chat=chat, system=system) for t in texts]
    ids = tok.encode_batch(rendered)
    truncated = sum(len(x) > max_length for x in ids)
    return [x[-max_length:] for x in ids], truncated


def collate_prompts(ids: Sequence[list[int]], texts, references, pad_id: int) -> PromptBatch:
    input_ids, mask = left_pad(ids, pad_id)
    return PromptBatch(input_ids, mask, list(texts), list(references))

