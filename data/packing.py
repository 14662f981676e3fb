"""Packing documents into fixed-length training rows with document boundaries.

Documents are tokenized as [BOS] + tokens + [EOS] and concatenated into one token stream. Row k is the window
w = stream[k*T : k*T + T + 1] (so consecutive rows share one token, nanoGPT-style) and becomes, for t < T:

    input_ids[t]    = w[t]
    labels[t]       = w[t + 1], or -100 when w[t + 1] starts another document (no target across documents)
    position_ids[t] = t - (start of t's document segment inside the row); 0 at every document start and at t = 0
    doc_ids[t]      = index of t's document segment inside the row: 0, 0, 0, 1, 1, 2, ...

so a packed row computes exactly what running each of its segments alone would. Everything here is vectorised
numpy over whole batches; the only per-document work is the tokenizer call.
"""

from typing import NamedTuple

import numpy as np

IGNORE_INDEX = -100
FIELDS = ("input_ids", "labels", "position_ids", "doc_ids")


class TokenDocs(NamedTuple):
    """Several tokenized documents: their tokens concatenated, and each one's length."""

    flat: np.ndarray
    lengths: np.ndarray


def assemble(source: np.ndarray, starts: np.ndarray, lengths: np.ndarray, bos: int, eos: int) -> np.ndarray:
    """[BOS] doc [EOS] [BOS] doc [EOS] ... as int32, document i being source[starts[i] : starts[i] + lengths[i]]."""
    n = len(lengths)
    total = int(lengths.sum())
    out = np.empty(total + 2 * n, dtype=np.int32)
    ends = np.cumsum(lengths + 2)
    out[ends - lengths - 2] = bos
    out[ends - 1] = eos
    body = np.ones(len(out), dtype=bool)
    body[ends - lengths - 2] = False
    body[ends - 1] = False
    if n and np.array_equal(starts[1:], starts[:-1] + lengths[:-1]):  # already in order: one slice, no index arrays
        out[body] = source[starts[0] : starts[0] + total]
    elif n:
        offsets = np.cumsum(lengths) - lengths
        out[body] = source[np.repeat(starts - offsets, lengths) + np.arange(total)]
    return out


def pack_rows(
    tokens: np.ndarray, starts: np.ndarray, num_rows: int, max_length: int, rows: slice | None = None
) -> dict[str, np.ndarray]:
    """Build `num_rows` packed rows from the front of a token stream (see the module docstring).

    tokens: 1-D token stream with at least num_rows * T + 1 entries; starts: same length, True at the first token of
    every document. `rows` selects which of the rows to materialise (the others are only skipped over).
    Returns int64 arrays of shape (rows, T).
    """
    T = max_length
    assert len(tokens) >= num_rows * T + 1, f"need {num_rows * T + 1} tokens, have {len(tokens)}"
    first, last = (rows.start or 0, rows.stop if rows.stop is not None else num_rows) if rows else (0, num_rows)
    tokens, starts = tokens[first * T : last * T + 1], starts[first * T : last * T + 1]
    n = last - first
    # (n, T + 1) overlapping windows: a view, no copy.
    win = np.lib.stride_tricks.as_strided(tokens, (n, T + 1), (T * tokens.strides[0], tokens.strides[0]))
    new_doc = np.lib.stride_tricks.as_strided(starts, (n, T + 1), (T * starts.strides[0], starts.strides[0]))
    input_ids = win[:, :T].astype(np.int64)
    labels = win[:, 1:].astype(np.int64)
    np.putmask(labels, new_doc[:, 1:], IGNORE_INDEX)
    doc_ids = np.empty((n, T), dtype=np.int64)
    doc_ids[:, 0] = 0
    np.cumsum(new_doc[:, 1:T], axis=1, dtype=np.int64, out=doc_ids[:, 1:])  # a row always opens segment 0
    t = np.arange(T, dtype=np.int64)
    position_ids = np.where(new_doc[:, :T], t, 0)  # index of each segment start (column 0 is 0 either way) ...
    np.maximum.accumulate(position_ids, axis=1, out=position_ids)  # ... carried forward over the segment ...
    np.subtract(t, position_ids, out=position_ids)  # ... and subtracted
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "doc_ids": doc_ids}


class RowBuffer:
    """The packer's token buffer: documents go in, rows of T + 1 tokens (overlapping by one) come out."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self._tokens = np.empty(0, dtype=np.int32)
        self._starts = np.empty(0, dtype=bool)

    def __len__(self) -> int:
        return len(self._tokens)

    def rows_available(self) -> int:
        return max(0, (len(self._tokens) - 1) // self.max_length)

    def push(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Append whole documents (already wrapped in BOS/EOS); `doc_lengths` sums to len(tokens)."""
        starts = np.zeros(len(tokens), dtype=bool)
        starts[np.cumsum(doc_lengths) - doc_lengths] = True
        self._tokens = np.concatenate([self._tokens, tokens.astype(np.int32, copy=False)])
        self._starts = np.concatenate([self._starts, starts])

    def drop(self, n: int) -> None:
        """Forget the first `n` tokens (used when resuming in the middle of a chunk)."""
        self._tokens, self._starts = self._tokens[n:], self._starts[n:]

    def pop_rows(self, num_rows: int, rows: slice | None = None) -> dict[str, np.ndarray]:
        """Take `num_rows` rows off the front, materialising only `rows` of them; the last token starts the next row."""
        out = pack_rows(self._tokens, self._starts, num_rows, self.max_length, rows)
        self.drop(num_rows * self.max_length)
        return out
