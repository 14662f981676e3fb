"""Opening and reading document sources: local files and folders, Hub streams, the built-in corpus and token caches.

Every source yields plain documents; three shapes exist because they are read differently:
- `ArrowSource`: a map-style `datasets.Dataset` (local files, the built-in corpus). Random access by index on the
  memory-mapped Arrow table, so a position is restored in O(1) and each pass can be shuffled by a permutation.
- `StreamSource`: a `datasets.IterableDataset` (the Hub). Read in order; its position is the iterable's own
  `state_dict()`.
- `CacheSource` (data/cache.py): documents already tokenized into memory-mapped shards.

`SourceCursor` reads one source pass after pass: map-style sources in a fresh keyed pseudo-random permutation per
pass (`permute`, a Feistel network), streams in order. The stream (data/stream.py) and tokenizer training
(data/tokenizer.py) both read sources through it.

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
from .mix import TEXT_SUFFIXES, SourceSpec
from .packing import TokenDocs

_COLUMN_HINT = "; name the field with --text-column"
PERMUTATION_CACHE_DOCS = 1 << 22  # up to 4M documents a pass's permutation is computed once (32 MB), not per chunk
HUB_UNREACHABLE = (
    "cannot stream {name} from the Hugging Face Hub ({error}); without network access pass a local "
    "path to --dataset (a .txt/.jsonl/.parquet file or folder) or use --dataset builtin"
)


SNIFF_BYTES = 1 << 16  # the head of each local file checked up front (empty, binary, not UTF-8, first JSON line)


NUL = b"\0"


class DataError(ValueError):
    """Bad data, named by file (and line where there is one): one line and exit code 2, even when found mid-run."""


def check_local_files(mix) -> None:
    """Cheap checks of every local file a mix reads, before anything expensive: a few KB of each file.

    Catches empty and binary files, text that is not UTF-8, parquet files that are not parquet, and a first JSON
    line that is invalid or has no string `text`. Problems further inside a file are found, with the file and line,
    when the source is opened (`open_source`) or, for a stream, when the line is reached (`StreamSource.take`).
    """
    for spec in mix.sources:
        if spec.kind == "files":
            for path in list_data_files(Path(spec.location)):
                check_file_head(path)


def check_file_head(path: Path) -> None:
    """DataError naming `path` when its first SNIFF_BYTES bytes show that it cannot be a document file."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if not head:
        raise DataError(f"{path} is empty")
    if path.name.lower().endswith(".parquet"):
        if not head.startswith(b"PAR1"):
            raise DataError(f"{path} is not a parquet file (no PAR1 header)")
        return
    if b"\0" in head:
        raise DataError(f"{path} is binary, not text (a NUL byte at offset {head.index(NUL)})")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if len(head) < SNIFF_BYTES or e.start < len(head) - 3:  # not just a character cut at the end of the head
            raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") from None
        text = head[: e.start].decode("utf-8")
    if path.name.lower().endswith(".jsonl"):
        lines = text.splitlines()
        complete = lines[:-1] if len(head) == SNIFF_BYTES else lines
        first = next(((i, line) for i, line in enumerate(complete, 1) if line.strip()), None)
        if first is not None:
            _check_json_record(first[1], path, first[0])


def _check_json_record(line: str, path: Path, lineno: int) -> None:
    try:
        record = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{path}:{lineno}: JSON nested too deeply to be a record") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: a record must be a JSON object with a 'text' field, got {_kind(record)}")
    if "text" not in record:
        fields = ", ".join(list(record)[:8])
        raise DataError(f"{path}:{lineno}: no 'text' field (fields: {fields}); each record needs its document there")
    if not isinstance(record["text"], str):
        raise DataError(f"{path}:{lineno}: 'text' must be a string, got {_kind(record['text'])}")


def _kind(value) -> str:
    return "null" if value is None else {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)


def first_bad_record(files: list[Path]) -> DataError | None:
    """The first line of these JSON-lines files that is not an object with a string `text`, as a DataError."""
    for path in files:
        if path.name.lower().endswith(".parquet"):
            continue
        try:
            check_file_head(path)
            if not path.name.lower().endswith((".jsonl", ".json")):
                _check_utf8(path)
                continue
            with open(path, encoding="utf-8") as f:
                if path.name.lower().endswith(".json") and f.read(1) == "[":  # one JSON array, not JSON lines
                    f.seek(0)
                    _check_json_array(path, f.read())
                    continue
                f.seek(0)
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        _check_json_record(line, path, lineno)
        except DataError as e:
            return e
        except UnicodeDecodeError as e:
            return DataError(f"{path} is not UTF-8 text ({e.reason})")
    return None


def _check_utf8(path: Path) -> None:
    with open(path, "rb") as f:
        offset, tail = 0, b""
        while chunk := f.read(1 << 20):
            block = tail + chunk
            try:
                block.decode("utf-8")
                tail = b""
            except UnicodeDecodeError as e:
                if e.start < len(block) - 3:
                    raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {offset + e.start})") from None
                tail = block[e.start :]
                block = block[: e.start]
            offset += len(block)
        if tail:
            raise DataError(f"{path} is not UTF-8 text (it ends inside a character)")


def _check_json_array(path: Path, text: str) -> None:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}: record {i + 1} is not an object with a string 'text' field")


def _load_failure(files: list[Path], error: Exception) -> DataError:
    """Why a local load failed, named by file and line where the files tell; else the library's own reason."""
    found = first_bad_record(files)
    if found is not None:
        return found
    cause = error.__cause__ or error.__context__ or error
    names = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
    return DataError(f"cannot read {names}: {_one_line(cause)}")


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


def list_data_files(path: Path) -> list[Path]:
    """A file itself, or every .txt/.jsonl/.json/.parquet file under a folder, sorted by relative path."""
    if path.is_file():
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.name.lower().endswith(TEXT_SUFFIXES)
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise ValueError(f"the folder {path} holds no .txt, .jsonl, .json or .parquet files")
    return files


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
                        f"'text' that is {_kind(text)}, not a string"
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
                f"reading {self.label} failed mid-stream: {_one_line(e.__cause__ or e)}"
            ) from None
        self.pos_hint += len(out)
        return out


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


def document_texts(mix, max_docs: int, held_out: bool = True, chunk: int = 256) -> list[str]:
    """Up to `max_docs` documents of the last stage of `mix`, in each source's natural order (no seed involved).

    held_out=True keeps the documents training holds out (`is_eval`), False keeps all of them. Sources are read in
    turn, `chunk` documents at a time, each for at most one pass; evaluation reads them (eval.py).
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
    with _quiet_datasets():
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
        _check_parquet_text(group, column)
    kwargs = {"sample_by": "paragraph"} if kind == "text" else {}
    if kind == "parquet":
        kwargs["columns"] = [column]
    try:
        ds = datasets.load_dataset(
            kind, data_files=[str(f) for f in group], split="train", streaming=streaming, **kwargs
        )
    except Exception as e:  # DatasetGenerationError, ArrowInvalid, UnicodeDecodeError...: find the file and line
        raise _load_failure(group, e) from None
    if ds.column_names is None:  # JSON read as a stream: fields are known only when read (StreamSource.take)
        return ds if column == "text" else ds.rename_column(column, "text")
    if column not in ds.column_names:
        raise ValueError(
            f"{group[0]} has no {column!r} field (fields: {', '.join(ds.column_names)}); "
            f"each record needs its document in {column!r}{_COLUMN_HINT}"
        )
    ds = _as_text(ds, column)
    if not streaming:
        _check_text_column(ds, group)
    if kind == "text":  # paragraphs keep the newlines around them; blank ones are not documents
        ds = ds.map(_strip_texts, batched=True).filter(_has_text, batched=True)
    return ds


def _check_text_column(ds, files: list[Path]) -> None:
    """Every `text` value a string: JSON numbers, lists or nulls there are named by file and line."""
    column = ds.data.table.column("text")
    if str(column.type) in ("string", "large_string") and column.null_count == 0:
        return
    raise first_bad_record(files) or DataError(
        f"the 'text' field of {files[0]} holds {column.type} values (or nulls), not strings"
    )


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


def _check_parquet_text(files: list[Path], column: str = "text") -> None:
    import pyarrow.parquet as pq

    for f in files:
        names = pq.read_schema(f).names
        if column not in names:
            raise ValueError(
                f"{f} has no {column!r} column (columns: {', '.join(names)}); each row needs its document in "
                f"{column!r}{_COLUMN_HINT}"
            )


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
    _check_parquet_text(files[:1], spec.text_column)
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
        raise ValueError(HUB_UNREACHABLE.format(name=name, error=_one_line(e))) from None
    column = spec.text_column
    if ds.column_names is not None:  # NOTE: None when the Hub does not describe the features up front
        if column not in ds.column_names:
            raise ValueError(
                f"the Hub dataset {name} has no {column!r} column (columns: {', '.join(ds.column_names)}){_COLUMN_HINT}"
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


def _one_line(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) < 160 else text[:157] + "..."
