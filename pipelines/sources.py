"""Random-access document sources: text files, JSONL, Parquet, ArrayRecord, the built-in corpus.

Every source is a Grain `RandomAccessDataSource` of documents (`str`): `len(source)` and
`source[i]`. Indexes hold byte offsets only, never the text, so sources stay small, picklable
(Grain worker processes get a copy) and cheap to open on every host.

- text files (`.txt`, `.md`, `.py`, ...): one document per file, cut at line boundaries into
  documents of at most `max_doc_bytes` so a single huge file still shuffles;
- JSONL (`.jsonl`, `.json` with one object per line): the `field` of each line (default `text`);
- Parquet (`.parquet`): the `field` column, read one row group at a time (needs `pyarrow`);
- ArrayRecord (`.array_record`, `.arrayrecord`): each record is one UTF-8 document;
- `default_corpus()`: the Python standard library's own `.py` files, a corpus that ships with
  every Python and needs no download.
"""

from __future__ import annotations

import bisect
import json
import os
import sysconfig
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from l4jax.errors import ConfigError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")
MAX_DOC_BYTES = 1 << 20


def _line_chunks(path: Path, max_bytes: int) -> list[tuple[int, int]]:
    """(start, end) byte ranges covering the file, cut after a newline, each <= max_bytes
    (unless one line is longer)."""
    size = path.stat().st_size
    if size <= max_bytes:
        return [(0, size)] if size else []
    spans, start = [], 0
    with open(path, "rb") as f:
        while start < size:
            end = min(start + max_bytes, size)
            if end < size:
                f.seek(start)
                cut = f.read(end - start).rfind(b"\n")
                end = start + cut + 1 if cut >= 0 else end
            spans.append((start, end))
            start = end
    return spans


class TextFileSource:
    """Documents from plain-text files: each file (or each <= max_doc_bytes chunk of it)."""

    def __init__(self, paths: Sequence[str | os.PathLike], max_doc_bytes: int = MAX_DOC_BYTES):
        self.paths = [str(p) for p in paths]
        self._spans: list[tuple[int, int, int]] = []  # (file index, start, end)
        for i, path in enumerate(self.paths):
            self._spans += [(i, s, e) for s, e in _line_chunks(Path(path), max_doc_bytes)]

    def __len__(self) -> int:
        return len(self._spans)

    def __getitem__(self, index: int) -> str:
        file_index, start, end = self._spans[index]
        with open(self.paths[file_index], "rb") as f:
            f.seek(start)
            return f.read(end - start).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"TextFileSource({len(self.paths)} files, {len(self)} documents)"


class JsonlSource:
    """Documents from JSON-lines files: `record[field]` of each non-empty line.

    Every line is parsed once when the source opens (before any training step compiles), so a
    broken line is an error naming its file and line number up front; the index keeps byte
    offsets only.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], field: str = "text"):
        self.paths = [str(p) for p in paths]
        self.field = field
        self._lines: list[tuple[int, int, int]] = []  # (file index, byte offset, line number)
        for i, path in enumerate(self.paths):
            offset = 0
            with open(path, "rb") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        self._record(path, number, line)
                        self._lines.append((i, offset, number))
                    offset += len(line)

    def _record(self, path: str, number: int, line: bytes) -> str:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}:{number}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get(self.field), str):
            raise ConfigError(f"{path}:{number}: no string field {self.field!r}")
        return record[self.field]

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, index: int) -> str:
        file_index, offset, number = self._lines[index]
        path = self.paths[file_index]
        with open(path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        return self._record(path, number, line)

    def __repr__(self) -> str:
        return f"JsonlSource({len(self.paths)} files, {len(self)} documents)"


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            "reading Parquet needs pyarrow: pip install 'l4jax[data]' (or pyarrow)"
        ) from None
    return pq


class ParquetSource:
    """Documents from the `field` column of Parquet files, read one row group at a time."""

    def __init__(self, paths: Sequence[str | os.PathLike], field: str = "text"):
        pq = _pyarrow_parquet()
        self.paths = [str(p) for p in paths]
        self.field = field
        self._groups: list[tuple[int, int]] = []  # (file index, row group)
        self._starts: list[int] = []  # first row of each group, global
        rows = 0
        for i, path in enumerate(self.paths):
            meta = pq.ParquetFile(path).metadata
            if field not in meta.schema.names:
                raise ConfigError(f"{path}: no column {field!r} (columns: {meta.schema.names})")
            for g in range(meta.num_row_groups):
                self._groups.append((i, g))
                self._starts.append(rows)
                rows += meta.row_group(g).num_rows
        self._rows = rows
        self._cache: tuple[int, list[str]] | None = None

    def __len__(self) -> int:
        return self._rows

    def __getitem__(self, index: int) -> str:
        group = bisect.bisect_right(self._starts, index) - 1
        if self._cache is None or self._cache[0] != group:
            file_index, row_group = self._groups[group]
            table = (
                _pyarrow_parquet()
                .ParquetFile(self.paths[file_index])
                .read_row_group(row_group, columns=[self.field])
            )
            self._cache = (group, table.column(self.field).to_pylist())
        return self._cache[1][index - self._starts[group]]

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}

    def __repr__(self) -> str:
        return f"ParquetSource({len(self.paths)} files, {len(self)} documents)"


class ArrayRecordSource:
    """Documents from ArrayRecord files: each record is UTF-8 text."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = [str(p) for p in paths]

    @cached_property
    def _records(self):
        import grain

        return grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> str:
        return bytes(self._records[index]).decode("utf-8", errors="replace")

    def __getstate__(self):
        return {"paths": self.paths}

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} files, {len(self)} documents)"


class ConcatSource:
    """Several sources as one, in order."""

    def __init__(self, sources: Sequence):
        self.sources = list(sources)
        self._starts = [0]
        for source in self.sources:
            self._starts.append(self._starts[-1] + len(source))

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> str:
        i = bisect.bisect_right(self._starts, index) - 1
        return self.sources[i][index - self._starts[i]]

    def __repr__(self) -> str:
        return f"ConcatSource({self.sources})"


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for kind, suffixes in (
        ("text", TEXT_SUFFIXES),
        ("jsonl", JSONL_SUFFIXES),
        ("parquet", PARQUET_SUFFIXES),
        ("array_record", ARRAY_RECORD_SUFFIXES),
    ):
        if name.endswith(suffixes):
            return kind
    if ".array_record-" in name:  # sharded ArrayRecord: name.array_record-00000-of-00008
        return "array_record"
    return None


def open_source(path: str | os.PathLike, field: str = "text"):
    """A document source for a file or a directory (searched recursively, sorted by path).

    Files are recognised by suffix; a single file of unknown suffix is read as text.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--data {p}: no such file or directory")
    if p.is_file():
        files = {_kind(p) or "text": [p]}
    else:
        files = {}
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            kind = _kind(f)
            if kind is not None and not any(part.startswith(".") for part in f.parts):
                files.setdefault(kind, []).append(f)
        if not files:
            raise ConfigError(f"--data {p}: no text, JSONL, Parquet or ArrayRecord files inside")
    builders = {
        "text": lambda fs: TextFileSource(fs),
        "jsonl": lambda fs: JsonlSource(fs, field),
        "parquet": lambda fs: ParquetSource(fs, field),
        "array_record": lambda fs: ArrayRecordSource(fs),
    }
    sources = [builders[kind](fs) for kind, fs in sorted(files.items())]
    source = sources[0] if len(sources) == 1 else ConcatSource(sources)
    if len(source) == 0:
        raise ConfigError(f"--data {p}: no documents found")
    return source


def stdlib_files() -> list[Path]:
    """The top-level `.py` modules of this Python's standard library, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.glob("*.py") if f.is_file() and f.stat().st_size > 0)
    if not files:
        raise ConfigError(f"built-in corpus: no .py files in the standard library at {root}")
    return files


def default_corpus() -> TextFileSource:
    """The Python standard library's own source files: a corpus that needs no download
    (about 200 modules, ~8 MB of English docstrings and code)."""
    return TextFileSource(stdlib_files(), max_doc_bytes=64 * 1024)
