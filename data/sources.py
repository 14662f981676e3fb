"""Opening and reading document sources: local files and folders, Hub streams, the built-in corpus and token caches.

Every source yields plain documents; three shapes exist because they are read differently:
- `ArrowSource`: a map-style `datasets.Dataset` (local files, the built-in corpus). Random access by index on the
  memory-mapped Arrow table, so a position is restored in O(1) and each pass can be shuffled by a permutation.
- `StreamSource`: a `datasets.IterableDataset` (the Hub). Read in order; its position is the iterable's own
  `state_dict()`.
- `CacheSource` (data/cache.py): documents already tokenized into memory-mapped shards.

`SourceCursor` (data/order.py) reads one source pass after pass: map-style sources in a fresh keyed pseudo-random
permutation per pass (`permute`, a Feistel network), streams in order. The stream (data/stream.py) and tokenizer
training (data/tokenizer.py) both read sources through it.

A local folder laid out like the Hub corpus (`<root>/<subset>/*.parquet`) can be opened either way; only the
`load_dataset` call differs from the Hub path, which is how the tests exercise the streaming code offline. A local
copy of the default corpus (`smollm=PATH`, a "mirror" source) is streamed that way, like its Hub form.

Every source hands out its documents under the name `text`, whatever field `SourceSpec.text_column` reads.
"""

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np

from .builtin import builtin_corpus_path
from .cache import CacheSource
from .files import (
    COLUMN_HINT,
    DataError,
    check_parquet_text,
    check_text_column,
    first_bad_record,
    kind_of,
    list_data_files,
    load_failure,
    one_line,
)
from .mix import SourceSpec
from .order import is_eval, text_hashes

HUB_UNREACHABLE = (
    "cannot stream {name} from the Hugging Face Hub ({error}); without network access pass a local "
    "path to --dataset (a .txt/.jsonl/.parquet file or folder) or use --dataset builtin"
)


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars or logged errors from `datasets` while it reads local files: every failure is raised as one
    DataError by the caller, and a successful read needs no progress output."""
    import datasets
    from datasets.utils import logging as ds_logging

    bars, level = not datasets.are_progress_bars_disabled(), ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def open_source(spec: SourceSpec, *, streaming: bool = False):
    """Open one source. `streaming=True` reads local files through `IterableDataset` like the Hub path does."""
    if spec.kind == "builtin":
        path = builtin_corpus_path()
        return _open_files(
            SourceSpec("files", str(path), "builtin"), [path], streaming, fingerprint=f"builtin:{path.stem}"
        )
    if spec.kind == "files":
        return _open_files(spec, list_data_files(Path(spec.location)), streaming)
    if spec.kind == "hub":
        return _open_hub(spec)
    if spec.kind == "mirror":
        return _open_mirror(spec)
    if spec.kind == "cache":
        return CacheSource(Path(spec.location), int(spec.subset or 0))
    raise ValueError(f"unknown source kind {spec.kind!r}")


class ArrowSource:
    """Map-style text source backed by a memory-mapped Arrow table."""

    random_access = True

    def __init__(self, dataset, label: str, fingerprint: str):
        self.label = label
        self.fingerprint = fingerprint
        self.num_docs = len(dataset)
        # NOTE: take() on the raw pyarrow column is ~50x faster than Dataset.__getitem__ for scattered indices.
        self._column = dataset.data.table.column("text")

    def fetch(self, indices: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Texts of the documents at `indices` and their hashes."""
        texts = self._column.take(indices).to_pylist()
        return texts, text_hashes(texts)


class StreamSource:
    """Sequential text source backed by a `datasets.IterableDataset` (Hub streaming)."""

    random_access = False

    def __init__(self, dataset, label: str, fingerprint: str, num_docs: int | None, files: list[Path] | None = None):
        self.label = label
        self.files = files or []  # local files read as a stream: a bad line is then named by file and line
        self.fingerprint = fingerprint
        self.num_docs = num_docs
        self._dataset = dataset
        self._iterator = None
        self._epoch = 0
        self._state: dict | None = None
        self.pos_hint = 0  # documents read in this process (for messages only)

    def state(self) -> dict | None:
        """The iterable's position within the current pass (None = at the start of it)."""
        return self._dataset.state_dict() if self._iterator is not None else self._state

    def seek(self, epoch: int, state: dict | None) -> None:
        """Continue pass `epoch` from `state` (None = from its beginning).

        Pass e > 0 reads the shards in another order (`IterableDataset.set_epoch`); the order of documents inside
        a shard is kept, so the stream resumes exactly from its saved state.
        """
        self._iterator = None
        self._epoch = epoch
        self._state = state

    def take(self, n: int) -> list[str]:
        """Up to `n` next documents; fewer means this pass ended."""
        if n <= 0:
            return []
        if self._iterator is None:
            self._dataset.set_epoch(self._epoch)
            if self._state is not None:
                self._dataset.load_state_dict(self._state)
            # NOTE: the generator prepares its state on the first next(), so state() is only read after take().
            self._iterator = iter(self._dataset)
        out = []
        try:
            for example in self._iterator:
                text = example.get("text")
                if not isinstance(text, str):
                    raise DataError(
                        f"{self.label}: document {self.pos_hint + len(out) + 1} of pass {self._epoch + 1} has a "
                        f"'text' that is {kind_of(text)}, not a string"
                    )
                out.append(text)
                if len(out) == n:
                    break
        except DataError:
            raise
        except Exception as e:  # a malformed record reached mid-stream (network failures are not ValueErrors)
            if not isinstance(e, ValueError) and type(e).__name__ != "DatasetGenerationError":
                raise
            raise (first_bad_record(self.files) if self.files else None) or DataError(
                f"reading {self.label} failed mid-stream: {one_line(e.__cause__ or e)}"
            ) from None
        self.pos_hint += len(out)
        return out


# -----------------------------------------------------------------------------
# Opening


def _open_files(spec: SourceSpec, files: list[Path], streaming: bool, fingerprint: str | None = None):
    """Load local files with `datasets.load_dataset`, grouped by file type, concatenated in sorted order."""
    import datasets

    root = Path(spec.location)
    root = root if root.is_dir() else root.parent
    if fingerprint is None:
        listing = [(str(f.relative_to(root)), f.stat().st_size, content_digest(f)) for f in files]
        fingerprint = f"files:{spec.label}:{_digest(listing)}"
    if spec.text_column != "text":
        fingerprint += f":{spec.text_column}"
    with _quiet_datasets():  # flatten_indices and concatenation draw progress bars too
        parts = [_load_group(kind, group, streaming, spec.text_column) for kind, group in _group_by_type(files)]
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if streaming:
            return StreamSource(ds, spec.label, fingerprint, spec.size_hint, files=files)
        if len(ds) == 0:
            raise DataError(f"{spec.location} holds no documents")
        return ArrowSource(ds.flatten_indices() if ds._indices is not None else ds, spec.label, fingerprint)


def _load_group(kind: str, group: list[Path], streaming: bool, text_column: str = "text"):
    """One `load_dataset` over files of one type, reduced to a checked `text` column (taken from `text_column`)."""
    import datasets

    column = "text" if kind == "text" else text_column  # a .txt file's documents are always its text
    if kind == "parquet":
        check_parquet_text(group, column)
    kwargs = {"sample_by": "paragraph"} if kind == "text" else {}
    if kind == "parquet":
        kwargs["columns"] = [column]
    try:
        ds = datasets.load_dataset(
            kind, data_files=[str(f) for f in group], split="train", streaming=streaming, **kwargs
        )
    except Exception as e:  # DatasetGenerationError, ArrowInvalid, UnicodeDecodeError...: find the file and line
        raise load_failure(group, e) from None
    if ds.column_names is None:  # JSON read as a stream: fields are known only when read (StreamSource.take)
        return ds if column == "text" else ds.rename_column(column, "text")
    if column not in ds.column_names:
        raise ValueError(
            f"{group[0]} has no {column!r} field (fields: {', '.join(ds.column_names)}); "
            f"each record needs its document in {column!r}{COLUMN_HINT}"
        )
    ds = _as_text(ds, column)
    if not streaming:
        check_text_column(ds, group)
    if kind == "text":  # paragraphs keep the newlines around them; blank ones are not documents
        ds = ds.map(_strip_texts, batched=True).filter(_has_text, batched=True)
    return ds


def _strip_texts(batch: dict) -> dict:
    return {"text": [t.strip() for t in batch["text"]]}


def _has_text(batch: dict) -> list[bool]:
    return [bool(t) for t in batch["text"]]


def _group_by_type(files: list[Path]) -> list[tuple[str, list[Path]]]:
    """Consecutive runs of files with the same `load_dataset` builder (text, json or parquet)."""
    groups: list[tuple[str, list[Path]]] = []
    for f in files:
        name = f.name.lower()
        kind = "text" if name.endswith(".txt") else "parquet" if name.endswith(".parquet") else "json"
        if groups and groups[-1][0] == kind:
            groups[-1][1].append(f)
        else:
            groups.append((kind, [f]))
    return groups


def _as_text(ds, column: str):
    """Only the document column, named `text`."""
    ds = ds.select_columns([column])
    return ds if column == "text" else ds.rename_column(column, "text")


def _open_mirror(spec: SourceSpec) -> StreamSource:
    """Stream one subset of a local copy of a Hub corpus (`<root>/<subset>/**/*.parquet`), as the Hub path would.

    The parquet builder reads the files in place (no Arrow copy of a corpus that may be terabytes); the size used to
    balance the subsets is the row count in the parquet footers, so the interleaving is exact, not approximate.
    """
    import datasets
    import pyarrow.parquet as pq

    folder = Path(spec.location) / spec.subset
    files = sorted(folder.rglob("*.parquet"))
    if not files:
        raise ValueError(f"{folder} holds no .parquet files")
    check_parquet_text(files[:1], spec.text_column)
    num_docs = sum(pq.read_metadata(f).num_rows for f in files)
    listing = [(str(f.relative_to(folder)), f.stat().st_size) for f in files]
    fingerprint = f"mirror:{spec.subset}:{_digest(listing)}" + (
        f":{spec.text_column}" if spec.text_column != "text" else ""
    )
    ds = datasets.load_dataset(
        "parquet", data_files=[str(f) for f in files], split="train", streaming=True, columns=[spec.text_column]
    )
    return StreamSource(_as_text(ds, spec.text_column), spec.label, fingerprint, num_docs)


def _open_hub(spec: SourceSpec) -> StreamSource:
    """Stream a Hub dataset; any failure to reach it becomes one clear ValueError."""
    import datasets

    name = spec.location + (f"/{spec.subset}" if spec.subset else "")
    try:
        ds = datasets.load_dataset(spec.location, spec.subset, split="train", streaming=True)
    except Exception as e:  # connection, offline mode, missing repo or config: all mean "cannot use it"
        raise ValueError(HUB_UNREACHABLE.format(name=name, error=one_line(e))) from None
    column = spec.text_column
    if ds.column_names is not None:  # NOTE: None when the Hub does not describe the features up front
        if column not in ds.column_names:
            raise ValueError(
                f"the Hub dataset {name} has no {column!r} column (columns: {', '.join(ds.column_names)}){COLUMN_HINT}"
            )
        ds = _as_text(ds, column)
    elif column != "text":
        ds = ds.rename_column(column, "text")
    fingerprint = f"hub:{name}" + (f":{column}" if column != "text" else "")
    return StreamSource(ds, spec.label, fingerprint, _split_size(ds) or spec.size_hint)


def _split_size(ds) -> int | None:
    splits = getattr(ds.info, "splits", None) or {}
    split = splits.get("train") if hasattr(splits, "get") else None
    return getattr(split, "num_examples", None) or None


SAMPLED_ABOVE = 16 << 20  # files larger than this are fingerprinted from sampled blocks
_BLOCK, _BLOCKS = 64 << 10, 16


def content_digest(path: Path) -> str:
    """A fast digest of a file's bytes: all of them up to 16 MiB, else its size and 16 evenly spaced 64 KiB blocks
    (the first and last included: a parquet footer is always read), so an edit that keeps the size still changes
    the fingerprint. An edit to a large file that misses every sampled block goes unnoticed."""
    h = hashlib.blake2b(digest_size=16)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= SAMPLED_ABOVE:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        else:
            h.update(str(size).encode())
            for i in range(_BLOCKS):
                f.seek((size - _BLOCK) * i // (_BLOCKS - 1))
                h.update(f.read(_BLOCK))
    return h.hexdigest()


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def document_texts(mix, max_docs: int, held_out: bool = True, chunk: int = 256, tick=None) -> list[str]:
    """Up to `max_docs` documents of the last stage of `mix`, in each source's natural order (no seed involved).

    held_out=True keeps the documents training holds out (`is_eval`), False keeps all of them. Sources are read in
    turn, `chunk` documents at a time, each for at most one pass; evaluation reads them (eval.py). `tick(n)` is told
    of every n documents read (a held-out set is a small share of what is read: progress for long reads).
    """
    if mix.cache_dir:
        raise ValueError(f"{mix.cache_dir} is a token cache and holds no text; evaluate on the original data")
    readers = [_one_pass(open_source(spec), chunk) for spec in mix.stages[-1].sources]
    out: list[str] = []
    while len(out) < max_docs and readers:
        for reader in list(readers):
            texts = next(reader, None)
            if texts is None:
                readers.remove(reader)
                continue
            if tick is not None:
                tick(len(texts))
            wanted = is_eval(text_hashes(texts), mix.eval_fraction) if held_out else np.ones(len(texts), dtype=bool)
            out.extend(t for t, w in zip(texts, wanted, strict=True) if w and t)
    return out[:max_docs]


def _one_pass(source, chunk: int):
    """The documents of one pass over a text source, in order, `chunk` at a time."""
    if source.random_access:
        for start in range(0, source.num_docs, chunk):
            yield source.fetch(np.arange(start, min(start + chunk, source.num_docs)))[0]
        return
    source.seek(0, None)
    while texts := source.take(chunk):
        yield texts
        if len(texts) < chunk:
            return
