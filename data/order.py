"""The order documents are read in: counter-based randomness keyed by seed and source, a keyed permutation per pass
(a Feistel network), the held-out split by text hash, and `SourceCursor`, which reads one source pass after pass."""

import hashlib
import json

import numpy as np

from .packing import TokenDocs

PERMUTATION_CACHE_DOCS = 1 << 22  # up to 4M documents a pass's permutation is computed once (32 MB), not per chunk


def text_hashes(texts: list[str]) -> np.ndarray:
    """A stable 64-bit hash of each document's text; it decides the held-out split (see `is_eval`)."""
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
            for t in texts
        ],
        dtype=np.uint64,
    )


def is_eval(hashes: np.ndarray, eval_fraction: float) -> np.ndarray:
    """True for documents in the held-out split: those whose text hash falls below the fraction of the hash range."""
    threshold = np.uint64(min(int(eval_fraction * 2.0**64), 2**64 - 1))
    return hashes < threshold


# -----------------------------------------------------------------------------
# Counter-based randomness


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def stream_key(*parts) -> int:
    """A 64-bit key from any JSON-able parts (seed, names, indices)."""
    digest = hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def uniforms(key: int, start: int, n: int) -> np.ndarray:
    """The uniforms in [0, 1) numbered start .. start+n-1 of the random sequence `key`."""
    counters = np.arange(start, start + n, dtype=np.uint64)
    bits = _mix64(counters ^ np.uint64(key))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def permute(indices: np.ndarray, n: int, key: int) -> np.ndarray:
    """Image of `indices` under a keyed pseudo-random bijection of [0, n).

    An unbalanced Feistel network on the smallest bit width holding n-1 (each round xors one half with a keyed hash
    of the other, which is invertible for any split), plus cycle walking: values landing in [n, 2^bits) are mapped
    again until they land inside, which takes fewer than two rounds on average since 2^bits < 2n.
    """
    if n <= 1:
        return indices.astype(np.int64)
    bits = max(2, (n - 1).bit_length())
    lo_bits = bits // 2
    lo_mask, hi_mask = np.uint64((1 << lo_bits) - 1), np.uint64((1 << (bits - lo_bits)) - 1)
    shift = np.uint64(lo_bits)
    round_keys = [np.uint64(stream_key(key, r)) for r in range(4)]
    x = indices.astype(np.uint64)
    todo = np.arange(len(x))
    while len(todo):
        y = x[todo]
        hi, lo = y >> shift, y & lo_mask
        for r, k in enumerate(round_keys):
            if r % 2 == 0:
                hi ^= _mix64(lo ^ k) & hi_mask
            else:
                lo ^= _mix64(hi ^ k) & lo_mask
        y = (hi << shift) | lo
        x[todo] = y
        todo = todo[y >= np.uint64(n)]
    return x.astype(np.int64)


# -----------------------------------------------------------------------------
# Reading in order: a cursor per source


class SourceCursor:
    """Where one source stands: the pass (epoch) and the position inside it.

    Map-style sources are read in a fresh keyed permutation on every pass (`shuffle=True`); streamed sources are read
    in order (their shard order changes per pass). `take` returns texts (or token arrays for a cache) and hashes.
    """

    def __init__(self, source, key: int, shuffle: bool = True):
        self.source = source
        self.key = key
        self.shuffle = shuffle
        self.epoch = 0
        self.pos = 0
        self._permutation: tuple[int, np.ndarray] | None = None  # (epoch, its whole permutation) for small sources

    def take(self, n: int) -> tuple[list[str] | TokenDocs, np.ndarray]:
        """The next `n` documents (crossing into the next pass when this one ends) and their text hashes."""
        parts, hashes = [], []
        while n > 0:
            if self.source.random_access:
                size = self.source.num_docs
                m = min(n, size - self.pos)
                got, h = self.source.fetch(self._indices(self.pos, m))
                self.pos += m
                if self.pos == size:
                    self.epoch, self.pos = self.epoch + 1, 0
            else:
                got = self.source.take(n)
                m, h = len(got), text_hashes(got)
                self.pos += m
                if m < n:
                    if self.pos == 0:
                        raise ValueError(f"the source {self.source.label} yielded no documents")
                    self.epoch, self.pos = self.epoch + 1, 0
                    self.source.seek(self.epoch, None)
            parts.append(got)
            hashes.append(h)
            n -= m
        if len(parts) == 1:
            docs = parts[0]
        elif parts and isinstance(parts[0], TokenDocs):
            docs = TokenDocs(np.concatenate([p.flat for p in parts]), np.concatenate([p.lengths for p in parts]))
        else:
            docs = [d for p in parts for d in p]
        return docs, hashes[0] if len(hashes) == 1 else np.concatenate(hashes)

    def _indices(self, start: int, m: int) -> np.ndarray:
        """Document indices at positions [start, start + m) of the current pass."""
        size = self.source.num_docs
        if not self.shuffle:
            return np.arange(start, start + m, dtype=np.int64)
        key = stream_key(self.key, self.epoch)
        if size > PERMUTATION_CACHE_DOCS:
            return permute(np.arange(start, start + m, dtype=np.int64), size, key)
        if self._permutation is None or self._permutation[0] != self.epoch:  # whole pass at once: same values
            self._permutation = (self.epoch, permute(np.arange(size, dtype=np.int64), size, key))
        return self._permutation[1][start : start + m]

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "pos": self.pos}
        if not self.source.random_access:
            state["stream"] = self.source.state()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        if not self.source.random_access:
            self.source.seek(self.epoch, state.get("stream"))
