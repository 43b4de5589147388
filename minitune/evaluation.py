"""Exact-match accuracy of greedy answers on synthetic-task prompts (used by SFT and PPO)."""
from __future__ import annotations

import torch

from minitune.data.synthetic import is_correct
from minitune.generate import generate, left_pad


@torch.no_grad()
def greedy_accuracy(model, tok, examples: list[dict], *, max_new_tokens: int = 32, batch_size: int = 50,
                    device=None) -> tuple[float, list[tuple[str, str, str]]]:
    """(share of exactly correct greedy answers, [(prompt, answer, reference)]) for examples with
    `messages` (system + user first) and `answer`."""
    was_training = model.training
    model.eval()
    prompts = [tok.encode(tok.apply_chat_template(ex["messages"][:2], add_generation_prompt=True)) for ex in examples]
    answers = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[i: i + batch_size], tok.pad_id, device)
        out = generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_ids=tok.eos_ids, pad_id=tok.pad_id)
        answers += [tok.decode(t[: int(n)]) for t, n in zip(out.tokens, out.lengths)]
    model.train(was_training)
    correct = [is_correct(a, ex["answer"]) for a, ex in zip(answers, examples)]
    return sum(correct) / max(len(correct), 1), [(ex["prompt"], a, ex["answer"]) for ex, a in zip(examples, answers)]
