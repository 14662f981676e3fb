"""The training stream: interleaved, shuffled, packed, sharded across ranks and exactly resumable.

One deterministic packed stream of rows is defined by (mix, seed, tokenizer, max_length) alone. Global batch s is
rows [s*G, (s+1)*G) of it, G = batch_size * world_size, and rank r trains on rows [s*G + r*B, s*G + (r+1)*B). So
the global batches do not depend on the world size or on how ranks get their rows:
- sharded (default): every rank runs the whole stream and keeps its own rows. No communication; each rank repeats
  the tokenization, which a token cache (`python -m data.prepare`) makes nearly free.
- dispatch: rank 0 runs the stream and scatters each rank its rows with torch.distributed; other ranks read nothing.

Determinism without stored random state: every random choice is a keyed hash of a counter (which source the n-th
document comes from, which stage during a soft switch) and every pass over a map-style source is a keyed
pseudo-random permutation (a Feistel network, see `SourceCursor` in data/order.py), so a position is a handful of
integers and restoring it costs O(1). Documents are drawn in chunks of CHUNK_DOCS and tokenized with one
`encode_batch_fast` call per chunk. The stream state is the position before the oldest chunk still in the packer's
buffer plus how many of its tokens were consumed: restoring re-reads at most a couple of chunks and yields exactly
the rows an uninterrupted run would.
"""

import json
from collections import deque
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .cache import read_manifest
from .mix import Mix, Stage
from .order import SourceCursor, is_eval, stream_key, uniforms
from .packing import FIELDS, RowBuffer, TokenDocs, assemble
from .sources import open_source
from .tokenizer import bos_eos_ids, tokenizer_hash

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

CHUNK_DOCS = 1024  # documents drawn per chunk; stage switches and blend fractions are decided once per chunk
STATE_VERSION = 1


# -----------------------------------------------------------------------------
# Drawing documents


class Interleaver:
    """Chooses which source of a stage each next document comes from.

    Balanced: a draw without replacement over the documents of one pass over all sources (probability proportional
    to each source's remaining documents), so all sources end their pass together. Weighted: fixed probabilities.
    The n-th choice uses the n-th uniform of a keyed sequence, so the state is just counters.
    """

    def __init__(self, sizes: list[int], weights: list[float] | None, key: int):
        self.sizes = sizes
        self.key = key
        self.cum_weights = None if weights is None else np.cumsum(weights) / sum(weights)
        self.round, self.draws = 0, 0
        self.remaining = list(sizes)

    def pick(self, n: int) -> np.ndarray:
        if len(self.sizes) == 1:
            return np.zeros(n, dtype=np.int64)
        if self.cum_weights is not None:
            u = uniforms(self.key, self.draws, n)
            self.draws += n
            return np.minimum(np.searchsorted(self.cum_weights, u, side="right"), len(self.sizes) - 1)
        out = np.empty(n, dtype=np.int64)
        i = 0
        while i < n:
            total = sum(self.remaining)
            m = min(n - i, total)
            u = uniforms(stream_key(self.key, self.round), self.draws, m)
            rem = self.remaining
            for j in range(m):
                x = min(int(u[j] * total), total - 1)
                s = 0
                while x >= rem[s]:
                    x -= rem[s]
                    s += 1
                rem[s] -= 1
                total -= 1
                out[i + j] = s
            self.draws += m
            i += m
            if total == 0:
                self.round, self.draws, self.remaining = self.round + 1, 0, list(self.sizes)
        return out

    def state_dict(self) -> dict:
        return {"round": self.round, "draws": self.draws, "remaining": list(self.remaining)}

    def load_state_dict(self, state: dict) -> None:
        self.round, self.draws, self.remaining = state["round"], state["draws"], list(state["remaining"])


class DocumentStream:
    """Chunks of tokenized documents ([BOS] doc [EOS]) from a mix, for one split ("train" or "eval").

    Stages run in order; with a soft window, each document of a chunk comes from the next stage with a probability
    that grows linearly over the last `window` units of the current stage's budget.
    """

    def __init__(
        self,
        mix: Mix,
        encode,
        bos: int,
        eos: int,
        *,
        seed: int = 0,
        split: str = "train",
        shuffle: bool = True,
        stages: tuple[Stage, ...] | None = None,
        open_fn=open_source,
    ):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
        self.stages = stages if stages is not None else mix.stages
        self.encode, self.bos, self.eos = encode, bos, eos
        self.split, self.eval_fraction, self.seed = split, mix.eval_fraction, seed
        self.cursors = [
            [
                SourceCursor(open_fn(spec), stream_key(seed, "order", i, j), shuffle)
                for j, spec in enumerate(stage.sources)
            ]
            for i, stage in enumerate(self.stages)
        ]
        self.interleavers = [self._interleaver(i, stage) for i, stage in enumerate(self.stages)]
        self.stage, self.stage_tokens, self.stage_docs, self.docs_drawn, self.chunks = 0, 0, 0, 0, 0
        # Documents kept for this split and their tokens (with BOS/EOS), per source of every stage: [[docs, tokens]].
        self.drawn = [[[0, 0] for _ in stage.sources] for stage in self.stages]
        self.labels = list(dict.fromkeys(c.source.label for stage in self.cursors for c in stage))  # count order
        self._label_of = [[self.labels.index(c.source.label) for c in stage] for stage in self.cursors]
        width = max(len(stage) for stage in self.cursors)  # next_chunk's group id: stage * width + source
        self._label_of_group = np.array([i for stage in self._label_of for i in stage + [0] * (width - len(stage))])
        self.chunk_labels = np.empty(0, dtype=np.int64)  # the label of each document next_chunk returned last
        self._idle_since: tuple[int, list[int]] | None = None  # (stage, source epochs) at the last kept document

    @property
    def fingerprints(self) -> list[list[str]]:
        return [[c.source.fingerprint for c in stage] for stage in self.cursors]

    def next_chunk(self) -> tuple[np.ndarray, np.ndarray]:
        """Draw CHUNK_DOCS documents; return the kept ones as (tokens with BOS/EOS, per-document lengths)."""
        n = CHUNK_DOCS
        # Which stage and source each document comes from (the next stage only inside a soft-switch window).
        stage_of = np.full(n, self.stage, dtype=np.int64)
        blend = self._blend_fraction()
        if blend > 0:
            stage_of[uniforms(stream_key(self.seed, "blend"), self.docs_drawn, n) < blend] += 1
        source_of = np.empty(n, dtype=np.int64)
        for k in np.unique(stage_of):
            where = np.flatnonzero(stage_of == k)
            source_of[where] = self.interleavers[k].pick(len(where))
        # Read each source's documents in its own order, then lay them out in drawing order.
        width = max(len(stage) for stage in self.cursors)
        group = stage_of * width + source_of
        hashes = np.empty(n, dtype=np.uint64)
        texts = np.empty(n, dtype=object)
        is_text = np.zeros(n, dtype=bool)
        starts, lengths = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)  # token docs: where, how long
        pieces, base = [], 0
        for g in np.unique(group):
            where = np.flatnonzero(group == g)
            docs, hashes[where] = self.cursors[g // width][g % width].take(len(where))
            if isinstance(docs, TokenDocs):
                starts[where] = base + np.cumsum(docs.lengths) - docs.lengths
                lengths[where] = docs.lengths
                pieces.append(docs.flat)
                base += len(docs.flat)
            else:
                texts[where] = np.array(docs, dtype=object)
                is_text[where] = True
        keep = is_eval(hashes, self.eval_fraction) == (self.split == "eval")
        if (keep & is_text).any():
            ids = self.encode(texts[keep & is_text].tolist())
            n_ids = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            starts[keep & is_text] = base + np.cumsum(n_ids) - n_ids
            lengths[keep & is_text] = n_ids
            pieces.append(np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(n_ids.sum())))
        for g in np.unique(group[keep]):
            kept = keep & (group == g)
            counts = self.drawn[g // width][g % width]
            counts[0] += int(kept.sum())
            counts[1] += int(lengths[kept].sum()) + 2 * int(kept.sum())
        source = pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else np.empty(0, np.int32)
        tokens = assemble(source, starts[keep], lengths[keep], self.bos, self.eos)
        self.chunk_labels = self._label_of_group[group[keep]]
        self.docs_drawn += n
        self.chunks += 1
        self._advance_stage(int(keep.sum()), len(tokens))
        self._check_progress(int(keep.sum()))
        return tokens, lengths[keep] + 2

    def state_dict(self) -> dict:
        return {
            "stage": self.stage,
            "stage_tokens": self.stage_tokens,
            "stage_docs": self.stage_docs,
            "docs_drawn": self.docs_drawn,
            "chunks": self.chunks,
            "interleavers": [il.state_dict() for il in self.interleavers],
            "sources": [[c.state_dict() for c in stage] for stage in self.cursors],
            "drawn": [[list(c) for c in stage] for stage in self.drawn],
        }

    def load_state_dict(self, state: dict) -> None:
        self.stage, self.stage_tokens, self.stage_docs = state["stage"], state["stage_tokens"], state["stage_docs"]
        self.docs_drawn, self.chunks = state["docs_drawn"], state["chunks"]
        for il, s in zip(self.interleavers, state["interleavers"], strict=True):
            il.load_state_dict(s)
        for stage, states in zip(self.cursors, state["sources"], strict=True):
            for c, s in zip(stage, states, strict=True):
                c.load_state_dict(s)
        if "drawn" in state:  # NOTE: absent from data states saved before the counts were kept; they restart at 0
            self.drawn = [[list(c) for c in stage] for stage in state["drawn"]]
        self._idle_since = None

    def source_counts(self, state: dict | None = None) -> dict[str, dict[str, int]]:
        """Documents and tokens (with BOS/EOS) drawn from each source, by label (summed over stages): so far, or
        as of `state` (a `state_dict()` of this stream)."""
        drawn = self.drawn if state is None else state.get("drawn", [[[0, 0] for _ in s] for s in self.cursors])
        out = {label: {"docs": 0, "tokens": 0} for label in self.labels}
        for stage, labels in zip(drawn, self._label_of, strict=True):
            for (docs, tokens), label in zip(stage, labels, strict=True):
                out[self.labels[label]]["docs"] += docs
                out[self.labels[label]]["tokens"] += tokens
        return out

    # -- helpers

    def _interleaver(self, i: int, stage: Stage) -> Interleaver:
        sizes = [c.source.num_docs for c in self.cursors[i]]
        weights = [s.weight for s in stage.sources] if not stage.balanced else None
        if weights is None and any(size is None for size in sizes):
            weights = [1.0] * len(sizes)  # NOTE: balancing needs sizes; a stream of unknown length gets equal odds
        return Interleaver([size or 1 for size in sizes], weights, stream_key(self.seed, "interleave", i))

    def _blend_fraction(self) -> float:
        stage = self.stages[self.stage]
        if stage.budget is None or stage.window == 0:
            return 0.0
        done = self.stage_tokens if stage.unit == "tokens" else self.stage_docs
        return min(1.0, max(0.0, (done - (stage.budget - stage.window)) / stage.window))

    def _advance_stage(self, docs: int, tokens: int) -> None:
        self.stage_docs += docs
        self.stage_tokens += tokens
        stage = self.stages[self.stage]
        done = self.stage_tokens if stage.unit == "tokens" else self.stage_docs
        if stage.budget is not None and done >= stage.budget:
            self.stage, self.stage_tokens, self.stage_docs = self.stage + 1, 0, 0

    def _check_progress(self, kept: int) -> None:
        """Fail instead of looping forever when a whole pass over every source of the stage kept no document."""
        epochs = (self.stage, [c.epoch for c in self.cursors[self.stage]])
        if kept or self._idle_since is None or self._idle_since[0] != self.stage:
            self._idle_since = epochs
        elif all(e > e0 for e, e0 in zip(epochs[1], self._idle_since[1], strict=True)):
            what = "held-out (eval)" if self.split == "eval" else "training"
            names = ", ".join(c.source.label for c in self.cursors[self.stage])
            raise ValueError(
                f"the {what} split of {names} is empty: every document was read and none fell in it "
                f"(eval fraction {self.eval_fraction}); use more data or another fraction"
            )


# -----------------------------------------------------------------------------
# The packed stream


def rank_rows(rank: int, batch_size: int) -> slice:
    """Rows of a global batch that belong to `rank` (each rank has `batch_size` of them)."""
    return slice(rank * batch_size, (rank + 1) * batch_size)


class PackedStream:
    """Infinite iterator of this rank's training batches: dicts of int64 tensors of shape (batch_size, max_length).

    Keys: input_ids, labels (already shifted, -100 across documents), position_ids, doc_ids (see data/packing.py).
    `state_dict()` is JSON-serialisable and the same on every rank (save rank 0's); `load_state_dict(state)` resumes
    exactly, also with another world size or mode; with another max_length the rows continue at the next token of
    the same document stream. It raises ValueError when the data, tokenizer or seed differ from the run that saved
    it (a caller that wants to start over simply does not load the state).
    In dispatch mode only rank 0 reads data; tensors arrive on the process group's device (CUDA for NCCL).
    `joined`: rows are plain causal text, documents attending to the ones before them in the row (doc_ids 0 and
    positions 0..T-1, as an unpacked model sees a row); the labels and the stream are the same as without it.
    """

    def __init__(
        self,
        mix: Mix,
        tokenizer: "PreTrainedTokenizerFast",
        max_length: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        dispatch: bool = False,
        split: str = "train",
        group=None,
        open_fn=open_source,
        joined: bool = False,
    ):
        if max_length < 1 or batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"bad stream shape: max_length {max_length}, batch_size {batch_size}, rank {rank} of {world_size}"
            )
        self.mix, self.max_length, self.batch_size = mix, max_length, batch_size
        self.rank, self.world_size, self.seed, self.split = rank, world_size, seed, split
        self.dispatch, self.group, self.joined = dispatch and world_size > 1, group, joined
        self.rows = 0  # global rows emitted so far
        self._tokens = 0  # global tokens emitted so far (rows x max_length, summed over a max_length change)
        self._reader = not self.dispatch or rank == 0
        self._fingerprint = {
            "version": STATE_VERSION,
            "split": split,
            "seed": seed,
            "max_length": max_length,
            "eval_fraction": mix.eval_fraction,
            "tokenizer": tokenizer_hash(tokenizer),
            "stages": [
                {"budget": s.budget, "unit": s.unit, "window": s.window, "weights": [x.weight for x in s.sources]}
                for s in mix.stages
            ],
        }
        if self._reader:
            bos, eos = bos_eos_ids(tokenizer)
            backend = tokenizer.backend_tokenizer

            def encode(texts: list[str]) -> list[list[int]]:
                return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]

            stages = mix.stages if split == "train" else mix.stages[-1:]
            seed_used = seed if split == "train" else 0  # the held-out set is the same for every run
            self._docs = DocumentStream(
                mix,
                encode,
                bos,
                eos,
                seed=seed_used,
                split=split,
                shuffle=split == "train",
                stages=stages,
                open_fn=open_fn,
            )
            self._fingerprint["sources"] = self._docs.fingerprints
            self._check_cache()
            self._buffer = RowBuffer(max_length)
            # Each chunk in the buffer: (doc stream state before it, its token count, its documents' lengths and labels)
            self._log: deque[tuple[dict, int, np.ndarray, np.ndarray]] = deque()
            self._consumed = 0  # tokens of the oldest logged chunk already emitted in rows

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def current_stage(self) -> int:
        """Curriculum stage (0-based) of the documents at the front of the buffer (rank 0 only in dispatch mode)."""
        if not self._reader:
            return 0
        return self._log[0][0]["stage"] if self._log else self._docs.stage

    @property
    def epoch(self) -> int:
        """Completed passes over the current stage's sources (the least-read one), for logs; 0 on dispatch followers."""
        if not self._reader:
            return 0
        state = self._log[0][0] if self._log else self._docs.state_dict()
        return min(src["epoch"] for src in state["sources"][state["stage"] if self.split == "train" else 0])

    @property
    def tokens(self) -> int:
        """Global tokens emitted so far (rows × max_length)."""
        return self._tokens

    def source_counts(self) -> dict[str, dict[str, int]]:
        """Documents and tokens of each source in the rows emitted so far ({} on ranks that read no data): the
        counts before the oldest chunk still in the buffer, plus what rows took of it (a document counts from its
        first token)."""
        if not self._reader:
            return {}
        if not self._log:
            return self._docs.source_counts()
        before, _, lengths, labels = self._log[0]
        counts = self._docs.source_counts(before)
        starts = np.cumsum(lengths) - lengths
        taken = np.clip(self._consumed - starts, 0, lengths)  # tokens of each document already in emitted rows
        docs = np.bincount(labels[taken > 0], minlength=len(self._docs.labels))
        tokens = np.bincount(labels, weights=taken, minlength=len(self._docs.labels))
        for i, label in enumerate(self._docs.labels):
            counts[label]["docs"] += int(docs[i])
            counts[label]["tokens"] += int(tokens[i])
        return counts

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        G, B = self.global_batch_size, self.batch_size
        if self.dispatch:
            batch = self._scatter(self._next_rows(G) if self.rank == 0 else None)
        else:
            batch = {k: torch.from_numpy(v) for k, v in self._next_rows(G, rank_rows(self.rank, B)).items()}
        self.rows += G
        self._tokens += G * self.max_length
        return batch

    def next_global(self) -> dict[str, torch.Tensor]:
        """The whole next global batch (G rows) without splitting it by rank; used by eval and tests."""
        out = {k: torch.from_numpy(v) for k, v in self._next_rows(self.global_batch_size).items()}
        self.rows += self.global_batch_size
        self._tokens += self.global_batch_size * self.max_length
        return out

    def state_dict(self) -> dict:
        """JSON-serialisable position (see the class docstring)."""
        state = {"fingerprint": self._fingerprint, "rows": self.rows, "tokens": self.tokens}
        if self._reader:
            docs = self._log[0][0] if self._log else self._docs.state_dict()
            state.update(docs=docs, skip=self._consumed, stage=self.current_stage)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was saved; ValueError when it belongs to other data or settings."""
        self._check_fingerprint(state.get("fingerprint") or {})
        self.rows = state["rows"]
        self._tokens = state.get("tokens", self.rows * self.max_length)
        if not self._reader:
            return
        if "docs" not in state:
            raise ValueError("this data state was saved by a rank that does not read data; save rank 0's state")
        self._docs.load_state_dict(state["docs"])
        self._buffer = RowBuffer(self.max_length)
        self._log.clear()
        self._consumed = 0
        skip = state["skip"]
        while len(self._buffer) <= skip:  # refill the chunks that were in flight, then drop what was consumed
            self._pull_chunk()
        self._buffer.drop(skip)
        self._consumed = skip

    # -- helpers

    def _next_rows(self, n: int, rows: slice | None = None) -> dict[str, np.ndarray]:
        while self._buffer.rows_available() < n:
            self._pull_chunk()
        out = self._buffer.pop_rows(n, rows)
        if self.joined:  # one document per row, as far as attention and positions go
            out["doc_ids"][:] = 0
            out["position_ids"][:] = np.arange(self.max_length)
        self._consumed += n * self.max_length
        while self._log and self._consumed >= self._log[0][1]:  # chunks fully behind the next row's first token
            self._consumed -= self._log.popleft()[1]
        return out

    def _pull_chunk(self) -> None:
        before = self._docs.state_dict()
        tokens, lengths = self._docs.next_chunk()
        self._log.append((before, len(tokens), lengths, self._docs.chunk_labels))
        self._buffer.push(tokens, lengths)

    def _scatter(self, rows: dict[str, np.ndarray] | None) -> dict[str, torch.Tensor]:
        import torch.distributed as dist

        backend = dist.get_backend(self.group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        B, T = self.batch_size, self.max_length
        out = torch.empty(len(FIELDS), B, T, dtype=torch.int64, device=device)
        chunks = None
        if rows is not None:
            stacked = torch.from_numpy(np.stack([rows[k] for k in FIELDS])).to(device)  # (4, G, T)
            chunks = [stacked[:, rank_rows(r, B)].contiguous() for r in range(self.world_size)]
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        dist.scatter(out, chunks, src=src, group=self.group)
        return dict(zip(FIELDS, out.unbind(0), strict=True))

    def _check_fingerprint(self, saved: dict) -> None:
        mine = self._fingerprint  # NOTE: ranks that never read data (dispatch followers) cannot check the sources
        # NOTE: the position is a token position in the stream of documents, which max_length does not shape: rows
        # of another length continue at the very next token
        changed = [k for k in mine if saved.get(k) != mine[k] and k != "max_length"]
        if changed:
            details = ", ".join(f"{k} {_short(saved.get(k))} -> {_short(mine[k])}" for k in changed)
            raise ValueError(
                f"the saved data position belongs to different data or settings ({details}); restart "
                "the data from the beginning (train.py --no-restore-dataset-state) or restore the "
                "original settings"
            )

    def _check_cache(self) -> None:
        if not self.mix.cache_dir:
            return
        manifest = read_manifest(Path(self.mix.cache_dir))
        if manifest["tokenizer"]["hash"] != self._fingerprint["tokenizer"]:
            raise ValueError(
                f"the token cache {self.mix.cache_dir} was made with another tokenizer; pass "
                f"--tokenizer {self.mix.cache_dir}/tokenizer or prepare the cache again"
            )


def eval_batches(
    mix: Mix,
    tokenizer: "PreTrainedTokenizerFast",
    max_length: int,
    batch_size: int,
    num_batches: int,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> list[dict[str, torch.Tensor]]:
    """The held-out set: this rank's rows of the first `num_batches` global batches of the eval stream.

    The eval stream packs the held-out documents of the last stage's sources in their natural order (independent of
    the seed), so the global eval batches only depend on the mix, tokenizer, max_length and global batch size: the
    same for (world size 1, batch 4) and (world size 2, batch 2). Every rank gets `num_batches` batches of shape
    (batch_size, max_length); sum loss × tokens over ranks for the exact mean. Small corpora repeat their eval docs.
    """
    stream = PackedStream(mix, tokenizer, max_length, batch_size, world_size=world_size, split="eval")
    rows = rank_rows(rank, batch_size)
    return [{k: v[rows].clone() for k, v in stream.next_global().items()} for _ in range(num_batches)]


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
