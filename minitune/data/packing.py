"""ConstantLengthDataset: stream rows, tokenize in batches, pack into fixed-length blocks.

In the spirit of TRL's ConstantLengthDataset (StackLLaMA SFT): documents are joined with EOS and
cut into blocks of `seq_length` tokens with no padding. Beyond it:

- every block carries `position_ids` that restart at 0 at each document start; the model turns the
  restarts into a block-diagonal causal mask, so a packed document never attends to the one before
  it, with any attention backend (TRL isolates documents only with flash-attention varlen kernels).
  SDPA with a boolean mask was chosen over flex_attention: it runs everywhere (CPU included) with
  no compilation, and the mask costs T^2 booleans, small next to the logits.
- labels are next-token targets aligned with `input_ids` (no shift in the loss); prompt tokens,
  cross-document targets and padding carry -100.
- rows are sharded by rank and DataLoader worker: row i belongs to shard i % (world * workers).
- `state_dict()` / `load_state_dict()` capture the exact position (row index, token buffer,
  shuffle buffer and RNG) so a resumed iterator yields what the uninterrupted one would have.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from minitune.data.formats import Document
from minitune.errors import MinituneError
from minitune.train.rng import random_state, set_random_state

IGNORE = -100


@dataclass
class PackingStats:
    rows: int = 0  # rows of this shard read from the source
    documents: int = 0
    skipped_empty: int = 0  # empty / whitespace-only rows
    untrained_rows: int = 0  # rows with no trained token left (all masked)
    split_documents: int = 0  # documents longer than seq_length, spread over several blocks
    tokens: int = 0
    blocks: int = 0
    epochs: int = 0

    def summary(self) -> str:
        return (f"packing: {self.rows} rows -> {self.documents} documents, {self.tokens:,} tokens, {self.blocks} blocks; "
                f"skipped {self.skipped_empty} empty; {self.untrained_rows} with no trained token; "
                f"{self.split_documents} longer than seq_length split across blocks (none truncated)")


def _shard() -> tuple[int, int]:
    """(index, count) of this reader among all ranks and DataLoader workers."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info else (0, 1)
    return rank * nw + wid, world * nw


class ConstantLengthDataset(IterableDataset):
    """Yields dicts of `input_ids`, `labels`, `position_ids` (each LongTensor [seq_length]).

    source: a list, datasets.Dataset/IterableDataset or any re-iterable of rows. formatter: a batch
    function rows -> (documents, skipped), see `minitune.data.formats.make_formatter`.
    infinite: restart the source when exhausted. shuffle_buffer: number of blocks to shuffle among
    (0 = in order). drop_last: drop the final partial block (else pad it with -100 labels).
    rank/world_size: override the shard (default: torch.distributed and the DataLoader worker).
    """

    def __init__(
        self,
        source: Iterable[dict],
        formatter: Callable[[Sequence[dict]], tuple[list[Document | None], int]],
        *,
        seq_length: int = 1024,
        pad_id: int = 0,
        infinite: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        tokenize_batch: int = 256,
        drop_last: bool = True,
        shard: tuple[int, int] | None = None,
    ):
        self.source, self.formatter = source, formatter
        self.seq_length, self.pad_id = seq_length, pad_id
        self.infinite, self.shuffle_buffer, self.seed = infinite, shuffle_buffer, seed
        self.tokenize_batch, self.drop_last = tokenize_batch, drop_last
        self.fixed_shard = shard
        self.stats = PackingStats()
        self._resume: dict | None = None
        self._state: dict = {}

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Position after the last block handed out: plain Python types, JSON-serializable."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self._state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next iteration resumes from `state` instead of the start."""
        self._resume = dict(state)

    # -- iteration ---------------------------------------------------------------------------
    def _rows(self, start: int, shard: int, nshards: int) -> Iterator[tuple[int, dict]]:
        """(global row index, row) for this shard, from global index `start` on."""
        if hasattr(self.source, "__getitem__") and hasattr(self.source, "__len__"):
            first = start + ((shard - start) % nshards)
            for i in range(first, len(self.source), nshards):
                yield i, self.source[i]
        else:
            for i, row in enumerate(itertools.islice(self.source, start, None), start):
                if i % nshards == shard:
                    yield i, row

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        shard, nshards = self.fixed_shard or _shard()
        T = self.seq_length
        st = self._resume or {"epoch": 0, "next_row": 0, "ids": [], "labels_ok": [], "pos": [],
                              "shuffle": [], "rng": None}
        self._resume = None
        rng = random.Random(self.seed * 1000003 + shard)
        if st["rng"] is not None:
            set_random_state(rng, st["rng"])
        ids, ok, pos, shuffle = list(st["ids"]), list(st["labels_ok"]), list(st["pos"]), [tuple(b) for b in st["shuffle"]]
        epoch, next_row = st["epoch"], st["next_row"]

        def snapshot():
            self._state = {"epoch": epoch, "next_row": next_row, "ids": list(ids), "labels_ok": list(ok),
                           "pos": list(pos), "shuffle": [list(map(list, b)) for b in shuffle],
                           "rng": random_state(rng)}

        def emit(block):
            if self.shuffle_buffer <= 0:
                return block
            shuffle.append(block)
            if len(shuffle) < self.shuffle_buffer:
                return None
            j = rng.randrange(len(shuffle))
            shuffle[j], shuffle[-1] = shuffle[-1], shuffle[j]
            return shuffle.pop()

        def cut():
            # labels[t] = ids[t+1] when that token is trained and belongs to the same document.
            labels = [ids[t + 1] if ok[t + 1] and pos[t + 1] != 0 else IGNORE for t in range(T)]
            return ids[:T], labels, pos[:T]

        while True:
            whole_pass, pass_rows, pass_docs = next_row == 0, 0, 0
            rows = self._rows(next_row, shard, nshards)
            while True:
                batch = list(itertools.islice(rows, self.tokenize_batch))
                if not batch:
                    break
                next_row = batch[-1][0] + 1
                docs, skipped = self.formatter([r for _, r in batch])
                pass_rows += len(batch)
                pass_docs += len(batch) - skipped
                self.stats.rows += len(batch)
                self.stats.skipped_empty += skipped
                for d in docs:
                    if d is None:
                        continue
                    self.stats.documents += 1
                    self.stats.tokens += len(d.ids)
                    self.stats.untrained_rows += not any(d.trained[1:])
                    self.stats.split_documents += len(d.ids) > T
                    ids += d.ids
                    ok += d.trained
                    pos += range(len(d.ids))
                while len(ids) > T:  # a block needs the token after it for its last label
                    block = cut()
                    del ids[:T], ok[:T], pos[:T]
                    out = emit(block)
                    if out is not None:
                        snapshot()
                        self.stats.blocks += 1
                        yield _tensors(out)
            if not self.infinite:
                break
            if whole_pass and pass_docs == 0:  # restarting would spin forever without a token
                raise no_tokens_error(pass_rows, self.formatter, shard, nshards)
            epoch, next_row = epoch + 1, 0
            self.stats.epochs = epoch
        # end of a finite source: the partial block, then the shuffle buffer
        if ids and not self.drop_last:
            n = len(ids)
            pad = T + 1 - n
            ids += [self.pad_id] * pad
            ok += [False] * pad
            pos += [0] * pad  # each pad is its own "document": it attends to itself only
            block = cut()
            ids, ok, pos = [], [], []
            out = emit(block)
            if out is not None:
                snapshot()
                self.stats.blocks += 1
                yield _tensors(out)
        ids, ok, pos = [], [], []
        rng.shuffle(shuffle)
        while shuffle:
            out = shuffle.pop()
            snapshot()
            self.stats.blocks += 1
            yield _tensors(out)



def no_tokens_error(rows: int, formatter, shard: int = 0, nshards: int = 1) -> MinituneError:
    """The error for a pass over the data that produced no token: names the rows and the column."""
    if rows == 0:
        return MinituneError(f"reader {shard} of {nshards} (ranks x dataloader workers) received no rows: the data has "
                             "fewer rows than readers; use more data or fewer ranks/workers")
    what = formatter.describe() if hasattr(formatter, "describe") else "the text"
    return MinituneError(f"a full pass over the data produced no tokens: all {rows} rows read were empty or "
                         f"whitespace-only in {what}; check the column names in the config (data.*_column) and the data")


def _tensors(block) -> dict[str, torch.Tensor]:
    ids, labels, pos = block
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos)}
