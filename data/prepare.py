"""Pre-tokenized token cache: tokenize a mix once, then train from memory-mapped shards.

    python -m data.prepare --dataset SPEC --tokenizer SPEC --output DIR [--num-proc N] [--max-docs N]

Layout of DIR:
    manifest.json           format, tokenizer hash/BOS/EOS, dtype, the mix (stages and weights), per-source counts
    tokenizer/              a copy of the tokenizer (`--tokenizer DIR/tokenizer` or nothing: runs reuse it)
    source-<i>/tokens.bin   every document's token ids back to back (uint16 when the vocabulary fits, else uint32)
    source-<i>/offsets.npy  int64, document d is tokens[offsets[d]:offsets[d + 1]] (no BOS/EOS stored)
    source-<i>/hashes.npy   uint64 text hash per document (decides the held-out split without the text)

`--dataset DIR` then reads the cache in place of the original mix and yields the same batches (same documents,
order, held-out split): each cached source keeps its original fingerprint, so a run can even switch to its cache
and resume. Reading (data/cache.py) is two memory-mapped index lookups per document, restored in O(1).
"""

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from itertools import chain
from pathlib import Path

import numpy as np

from console import Ticker

from .cache import CACHE_FORMAT, CACHE_VERSION
from .mix import parse_mix
from .order import text_hashes
from .sources import open_source
from .tokenizer import bos_eos_ids, load_tokenizer, save_tokenizer, tokenizer_hash

_BATCH_DOCS = 1000  # documents per tokenizer call while preparing


def prepare(
    spec: str,
    tokenizer_spec: str,
    output: Path,
    *,
    num_proc: int = 1,
    max_docs: int | None = None,
    task_docs: int = 20_000,
    log=print,
) -> dict:
    """Tokenize every source of the mix `spec` into a cache at `output`; returns the manifest."""
    mix = parse_mix(spec)
    if mix.cache_dir:
        raise ValueError(f"{spec} is already a token cache")
    tok = load_tokenizer(tokenizer_spec)
    bos, eos = bos_eos_ids(tok)
    dtype = "uint16" if len(tok) <= 2**16 else "uint32"
    output = Path(output)
    if (output / "manifest.json").exists():
        raise ValueError(f"{output} already holds a token cache; choose another --output or delete it")
    output.mkdir(parents=True, exist_ok=True)
    keys: dict[tuple, int] = {}
    entries = []
    for source_spec in mix.sources:
        key = (source_spec.kind, source_spec.location, source_spec.subset)
        if key in keys:
            continue
        keys[key] = len(entries)
        folder = output / f"source-{len(entries)}"
        t0 = time.time()
        source = open_source(source_spec)
        n_docs, n_tokens = _prepare_source(
            source_spec, source, tok.backend_tokenizer.to_str(), folder, dtype, num_proc, max_docs, task_docs
        )
        fingerprint = source.fingerprint
        if source.num_docs is not None and n_docs < source.num_docs or source.num_docs is None and max_docs:
            fingerprint += f":first{n_docs}"  # a truncated copy is different data
        entries.append(
            {
                "label": source_spec.label,
                "dir": folder.name,
                "fingerprint": fingerprint,
                "num_docs": n_docs,
                "num_tokens": n_tokens,
            }
        )
        log(f"{source_spec.label}: {n_docs:,} documents, {n_tokens:,} tokens in {time.time() - t0:.1f}s")
    save_tokenizer(tok, output / "tokenizer")
    manifest = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "mix": mix.spec,
        "dtype": dtype,
        "tokenizer": {"hash": tokenizer_hash(tok), "bos": bos, "eos": eos, "vocab_size": len(tok)},
        "sources": entries,
        "stages": [
            {
                "budget": st.budget,
                "unit": st.unit,
                "window": st.window,
                "sources": [{"source": keys[(s.kind, s.location, s.subset)], "weight": s.weight} for s in st.sources],
            }
            for st in mix.stages
        ],
    }
    tmp = output / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.rename(output / "manifest.json")  # written last: a cache without a manifest is incomplete
    return manifest


def _prepare_source(
    spec, source, tokenizer_json: str, folder: Path, dtype: str, num_proc: int, max_docs: int | None, task_docs: int
) -> tuple[int, int]:
    """Write tokens.bin, offsets.npy and hashes.npy for one source; returns (documents, tokens)."""
    import tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    backend = tokenizers.Tokenizer.from_str(tokenizer_json)
    lengths, hashes = [], []
    total = (source.num_docs if max_docs is None else min(max_docs, source.num_docs)) if source.random_access else None
    with open(folder / "tokens.bin", "wb") as out, Ticker(spec.label, total=total, unit="documents") as tick:

        def write(tokens: np.ndarray, lens: np.ndarray, h: np.ndarray) -> None:
            out.write(tokens.tobytes())
            lengths.append(lens)
            hashes.append(h)
            tick.advance(len(lens))

        if source.random_access:
            n = source.num_docs if max_docs is None else min(max_docs, source.num_docs)
            if num_proc > 1 and n > task_docs:
                bounds = list(range(0, n, task_docs)) + [n]
                tasks = [(spec, tokenizer_json, a, b, dtype) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
                with mp.get_context("spawn").Pool(num_proc, initializer=_quiet_worker) as pool:
                    for result in pool.imap(_tokenize_range, tasks):  # in order, so the cache keeps source order
                        write(*result)
            else:
                for a in range(0, n, _BATCH_DOCS):
                    texts, h = source.fetch(np.arange(a, min(n, a + _BATCH_DOCS), dtype=np.int64))
                    write(*_encode(backend, texts, dtype), h)
        else:
            remaining = max_docs if max_docs is not None else float("inf")
            while remaining > 0:
                texts = source.take(int(min(_BATCH_DOCS, remaining)))
                if not texts:
                    break
                write(*_encode(backend, texts, dtype), text_hashes(texts))
                remaining -= len(texts)
    lens = np.concatenate(lengths) if lengths else np.empty(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    np.save(folder / "offsets.npy", offsets)
    np.save(folder / "hashes.npy", np.concatenate(hashes) if hashes else np.empty(0, np.uint64))
    return len(lens), int(offsets[-1])


def _tokenize_range(task: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize documents [a, b) of a random-access source in their natural order (in a worker process)."""
    import tokenizers

    spec, tokenizer_json, a, b, dtype = task
    source = open_source(spec)
    backend = tokenizers.Tokenizer.from_str(tokenizer_json)
    tokens, lengths, hashes = [], [], []
    for start in range(a, b, _BATCH_DOCS):
        texts, h = source.fetch(np.arange(start, min(b, start + _BATCH_DOCS), dtype=np.int64))
        t, n = _encode(backend, texts, dtype)
        tokens.append(t)
        lengths.append(n)
        hashes.append(h)
    return np.concatenate(tokens), np.concatenate(lengths), np.concatenate(hashes)


def _encode(backend, texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    ids = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def _quiet_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; avoid threads × processes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="dataset mix to tokenize (see data/mix.py)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, a folder holding one, or a Hub name")
    p.add_argument("--output", required=True, help="new folder for the cache")
    p.add_argument("--num-proc", type=int, default=1, help="worker processes for local sources (default 1)")
    p.add_argument(
        "--max-docs",
        type=int,
        default=None,
        help="tokenize at most this many documents per source "
        "(needed for Hub streams, which are otherwise read to the end)",
    )
    args = p.parse_args(argv)
    try:
        t0 = time.time()
        manifest = prepare(
            args.dataset, args.tokenizer, Path(args.output), num_proc=max(1, args.num_proc), max_docs=args.max_docs
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokens = sum(s["num_tokens"] for s in manifest["sources"])
    print(
        f"wrote {tokens:,} tokens ({manifest['dtype']}) to {args.output} in {time.time() - t0:.1f}s; "
        f"train with --dataset {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
