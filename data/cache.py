"""Reading a token cache written by `python -m data.prepare` (its layout is in data/prepare.py).

`read_manifest` checks that a folder is a complete cache of this version; `CacheSource` serves one cached source's
documents as token arrays through memory maps. This module imports nothing from data/ but packing.py, so the
mix parser, the sources and the stream read caches without importing the code that writes them.
"""

import json
from pathlib import Path

import numpy as np

from .packing import TokenDocs

CACHE_FORMAT = "small-llm-token-cache"
CACHE_VERSION = 1


def read_manifest(cache_dir: Path) -> dict:
    """The cache's manifest.json; ValueError when the folder is not a complete token cache of this version."""
    path = Path(cache_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path} ({type(e).__name__}); prepare the cache again") from None
    if manifest.get("format") != CACHE_FORMAT:
        raise ValueError(f"{cache_dir} holds a manifest.json that is not a token cache of this project")
    if manifest.get("version") != CACHE_VERSION:
        raise ValueError(
            f"the token cache {cache_dir} has version {manifest.get('version')}, this code reads "
            f"{CACHE_VERSION}; prepare it again"
        )
    return manifest


class CacheSource:
    """One cached source: random access to tokenized documents through memory maps."""

    random_access = True

    def __init__(self, cache_dir: Path, index: int):
        manifest = read_manifest(cache_dir)
        entry = manifest["sources"][index]
        self.label = entry["label"]
        self.fingerprint = entry["fingerprint"]
        self.num_docs = entry["num_docs"]
        folder = Path(cache_dir) / entry["dir"]
        # NOTE: plain ndarray views of the memory maps: indexing np.memmap objects costs ~10x more per call.
        self._offsets = np.asarray(np.load(folder / "offsets.npy", mmap_mode="r"))
        self._hashes = np.asarray(np.load(folder / "hashes.npy", mmap_mode="r"))
        dtype = np.dtype(manifest["dtype"])
        self._tokens = (
            np.asarray(np.memmap(folder / "tokens.bin", dtype=dtype, mode="r"))
            if entry["num_tokens"]
            else np.empty(0, dtype)
        )

    def fetch(self, indices: np.ndarray) -> tuple[TokenDocs, np.ndarray]:
        """Tokens of the documents at `indices` (concatenated, in that order) and their text hashes."""
        starts = self._offsets[indices]
        lengths = self._offsets[indices + 1] - starts
        total = int(lengths.sum())
        if len(indices) and np.all(np.diff(indices) == 1):  # consecutive documents: one slice
            flat = np.asarray(self._tokens[starts[0] : starts[0] + total])
        else:
            offsets = np.cumsum(lengths) - lengths
            flat = self._tokens[np.repeat(starts - offsets, lengths) + np.arange(total)]
        return TokenDocs(flat, lengths), self._hashes[indices]
