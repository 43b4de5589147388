"""Turning rows into token ids with a per-token "trained" flag.

A row is rendered into segments `(text, trained)`; segments are tokenized separately and joined,
so the prompt/response boundary is known exactly when tokenizing. Completion masks never depend on
finding a response template's token ids again afterwards (which fails when the tokenizer merges
the template with the text before it: trl #598, #1183).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple, Sequence

from minitune.errors import MinituneError
from minitune.tokenizer import Tokenizer


class Template(str, Enum):
    TEXT = "text"  # one text column, every token trained
    STACKLLAMA = "stackllama"  # "Question: <prompt>\n\nAnswer: <response>"
    ALPACA = "alpaca"  # instruction / input / output
    CHAT = "chat"  # a `messages` list rendered with the tokenizer's chat template


@dataclass
class Columns:
    """Column names in the source rows."""

    text: str = "text"
    prompt: str = "prompt"
    response: str = "response"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"


ALPACA_HEAD = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
ALPACA_HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)


class Segment(NamedTuple):
    text: str
    trained: bool


class Document(NamedTuple):
    """ids: token ids of one example (special prefix, segments, EOS). trained[i]: whether ids[i] is
    a training target (the loss at position i-1 predicts it)."""

    ids: list[int]
    trained: list[bool]


def _get(row: dict, col: str) -> Any:
    if col not in row:
        raise MinituneError(f"column {col!r} not found; the rows have columns {sorted(row)}")
    return row[col]


def render(row: dict, template: Template, tok: Tokenizer, cols: Columns, completion_only: bool = True) -> list[Segment]:
    """Segments for one row. With completion_only=False every segment is trained."""
    if template == Template.TEXT:
        segs = [Segment(str(_get(row, cols.text)), True)]
    elif template == Template.STACKLLAMA:
        segs = [Segment(f"Question: {_get(row, cols.prompt)}\n\nAnswer: ", False), Segment(str(_get(row, cols.response)), True)]
    elif template == Template.ALPACA:
        inp = row.get(cols.input) or ""
        head = ALPACA_HEAD_INPUT if inp.strip() else ALPACA_HEAD
        prompt = f"{head}### Instruction:\n{_get(row, cols.instruction)}\n\n"
        prompt += f"### Input:\n{inp}\n\n" if inp.strip() else ""
        segs = [Segment(prompt + "### Response:\n", False), Segment(str(_get(row, cols.output)), True)]
    elif template == Template.CHAT:
        segs = chat_segments(_get(row, cols.messages), tok)
    else:  # pragma: no cover - enum exhaustive
        raise MinituneError(f"unknown template {template}")
    if not completion_only:
        segs = [Segment(s.text, True) for s in segs]
    return segs


def chat_segments(messages: list[dict], tok: Tokenizer) -> list[Segment]:
    """Everything but assistant turns is masked. Each assistant turn is the text its chat template
    adds after the generation prompt (content plus end-of-turn tokens)."""
    segs, done = [], ""
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        prefix = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tok.apply_chat_template(messages[: i + 1])
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise MinituneError("the chat template does not render conversations prefix-consistently; use another template")
        segs += [Segment(prefix[len(done):], False), Segment(full[len(prefix):], True)]
        done = full
    rest = tok.apply_chat_template(messages)[len(done):]
    if rest:
        segs.append(Segment(rest, False))
    return segs


def special_prefix(tok: Tokenizer) -> list[int]:
    """Ids the tokenizer puts before every text (e.g. Llama's BOS); empty for SmolLM2."""
    with_special, plain = tok.encode("a", True), tok.encode("a", False)
    return with_special[: len(with_special) - len(plain)]


def tokenize_rows(
    rows: Sequence[dict],
    tok: Tokenizer,
    template: Template,
    cols: Columns,
    *,
    completion_only: bool = True,
    add_eos: bool = True,
) -> tuple[list[Document | None], int]:
    """Tokenizes a batch of rows in one batched call. Returns (documents, skipped): a row with an
    empty or whitespace-only text becomes None and is counted as skipped."""
    rendered: list[list[Segment] | None] = []
    for row in rows:
        segs = render(row, template, tok, cols, completion_only)
        trained_text = "".join(s.text for s in segs if s.trained)
        rendered.append(segs if trained_text.strip() else None)
    flat = [s.text for segs in rendered if segs for s in segs]
    encoded = iter(tok.encode_batch(flat, add_special_tokens=False)) if flat else iter(())
    prefix = special_prefix(tok)
    eos = tok.eos_id
    docs: list[Document | None] = []
    for segs in rendered:
        if segs is None:
            docs.append(None)
            continue
        ids, trained = list(prefix), [False] * len(prefix)
        for s in segs:
            piece = next(encoded)
            ids += piece
            trained += [s.trained] * len(piece)
        if add_eos and eos is not None and (not ids or ids[-1] != eos):
            # The EOS after a trained response is a target: the model must learn to stop.
            ids.append(eos)
            trained.append(bool(trained and trained[-1]) and template != Template.CHAT)
        docs.append(Document(ids, trained))
    return docs, sum(d is None for d in docs)


@dataclass(frozen=True)
class Formatter:
    """A batch formatter bound to one template, tokenizer and column set: rows -> (documents, skipped)."""

    template: Template
    tok: Tokenizer
    cols: Columns
    completion_only: bool = True

    def __call__(self, rows: Sequence[dict]) -> tuple[list[Document | None], int]:
        return tokenize_rows(rows, self.tok, self.template, self.cols, completion_only=self.completion_only)

    def describe(self) -> str:
        """The source columns this template reads, for error messages."""
        c = self.cols
        names = {Template.TEXT: [c.text], Template.STACKLLAMA: [c.prompt, c.response],
                 Template.ALPACA: [c.instruction, c.output], Template.CHAT: [c.messages]}[self.template]
        return f"{'column' if len(names) == 1 else 'columns'} {', '.join(map(repr, names))} ({self.template.value} template)"


def make_formatter(template: Template | str, tok: Tokenizer, cols: Columns | None = None, *,
                   completion_only: bool = True) -> Formatter:
    """A batch formatter bound to one template, tokenizer and column set."""
    return Formatter(Template(template), tok, cols or Columns(), completion_only)
