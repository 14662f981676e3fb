"""Local data files: which files a path means, and the checks of what they hold, made before any expensive work
(empty, binary or non-UTF-8 files, a bad JSON record, a missing text field), each one line naming file and line."""

import json
from pathlib import Path

from .mix import TEXT_SUFFIXES

COLUMN_HINT = "; name the field with --text-column"
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
        raise DataError(f"{path}:{lineno}: a record must be a JSON object with a 'text' field, got {kind_of(record)}")
    if "text" not in record:
        fields = ", ".join(list(record)[:8])
        raise DataError(f"{path}:{lineno}: no 'text' field (fields: {fields}); each record needs its document there")
    if not isinstance(record["text"], str):
        raise DataError(f"{path}:{lineno}: 'text' must be a string, got {kind_of(record['text'])}")


def kind_of(value) -> str:
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


def load_failure(files: list[Path], error: Exception) -> DataError:
    """Why a local load failed, named by file and line where the files tell; else the library's own reason."""
    found = first_bad_record(files)
    if found is not None:
        return found
    cause = error.__cause__ or error.__context__ or error
    names = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
    return DataError(f"cannot read {names}: {one_line(cause)}")


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


def check_text_column(ds, files: list[Path]) -> None:
    """Every `text` value a string: JSON numbers, lists or nulls there are named by file and line."""
    column = ds.data.table.column("text")
    if str(column.type) in ("string", "large_string") and column.null_count == 0:
        return
    raise first_bad_record(files) or DataError(
        f"the 'text' field of {files[0]} holds {column.type} values (or nulls), not strings"
    )


def check_parquet_text(files: list[Path], column: str = "text") -> None:
    import pyarrow.parquet as pq

    for f in files:
        names = pq.read_schema(f).names
        if column not in names:
            raise ValueError(
                f"{f} has no {column!r} column (columns: {', '.join(names)}); each row needs its document in "
                f"{column!r}{COLUMN_HINT}"
            )


def one_line(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) < 160 else text[:157] + "..."
