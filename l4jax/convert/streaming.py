"""The streaming pieces every conversion shares: a source's tensors, piece by piece, into a writer.

`plan_pieces` cuts routed experts into row pieces of about ROW_PIECE_BYTES (whole tensors
otherwise), `transfer` streams the pieces from a tensor source into a `Writer` with a reader
thread PREFETCH pieces ahead, and `atomic_directory` builds the output under a temporary name
that is renamed when complete and removed on any error. Used by `l4jax convert`
(`conversion.py`) and by `export_hf` (`export.py`); imports no reader or writer.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import glob
import logging
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from l4jax.convert import hostmem
from l4jax.convert.mapping import Entry
from l4jax.errors import CheckpointError

log = logging.getLogger(__name__)

ROW_PIECE_BYTES = 16 * 2**20  # routed experts are streamed in pieces of about this size
PREFETCH = 1  # pieces read ahead of the one being written


class Writer(Protocol):
    def row_block(self, entry: Entry) -> int: ...  # pieces of `entry` are multiples of this
    def write(self, entry: Entry, rows: slice, piece: np.ndarray) -> None: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...


def numpy_dtype(dtype: Any) -> np.dtype:
    """np.dtype of a name or dtype, "bfloat16" included."""
    return np.dtype(jnp.dtype(dtype))


def row_ranges(hf_shape: tuple[int, ...], block: int, itemsize: int) -> list[slice]:
    """Routed-expert tensors ([E, ...], the only 3-D ones: their split/join act expert by
    expert) in pieces of whole `block`s of rows, about ROW_PIECE_BYTES each; others whole."""
    if len(hf_shape) < 3:
        return [slice(None)]
    rows = hf_shape[0]
    block_bytes = block * math.prod(hf_shape[1:]) * itemsize
    step = block * max(1, ROW_PIECE_BYTES // block_bytes)
    if step >= rows:
        return [slice(None)]
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def plan_pieces(
    source: Any, entries: list[Entry], writer: Writer, itemsize: int
) -> list[tuple[Entry, slice]]:
    """(entry, rows) to read and write, in order: experts in row pieces when `source` can read
    rows (`get_rows`), whole tensors otherwise."""
    plan = []
    for entry in entries:
        block = writer.row_block(entry)
        if hasattr(source, "row_block"):  # (an l4jax source reads whole chunks)
            block = math.lcm(block, source.row_block(entry))
        ranges = row_ranges(entry.hf_shape, block, itemsize)
        if not hasattr(source, "get_rows"):
            ranges = [slice(None)]
        plan += [(entry, rows) for rows in ranges]
    return plan


def read_piece(source: Any, entry: Entry, rows: slice) -> np.ndarray:
    if rows == slice(None):
        return source.get(entry.hf_key)
    return source.get_rows(entry.hf_key, rows.start, rows.stop)


def transfer(
    source: Any,
    entries: list[Entry],
    writer: Writer,
    dtype: np.dtype,
    desc: str = "convert",
    progress: bool = True,
) -> int:
    """Stream every tensor of `entries` from `source` into `writer`; returns bytes written.

    A reader thread reads up to PREFETCH pieces ahead while this one writes, so reading and
    writing overlap (both release the GIL in their I/O and copies).
    """
    plan = plan_pieces(source, entries, writer, dtype.itemsize)
    total = sum(math.prod(e.hf_shape) for e in entries) * dtype.itemsize
    bar = tqdm(
        total=total, unit="B", unit_scale=True, desc=desc, leave=False,
        disable=not progress or not sys.stderr.isatty(),  # (a bar in a log is noise)
    )  # fmt: skip
    ends = [i + 1 == len(plan) or plan[i + 1][0] is not e for i, (e, _) in enumerate(plan)]
    done = 0
    ahead: collections.deque[concurrent.futures.Future] = collections.deque()
    with bar, concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="l4jax-read") as pool:
        try:
            for i, (entry, rows) in enumerate(plan):
                for entry_ahead, rows_ahead in plan[i + len(ahead) : i + 1 + PREFETCH]:
                    ahead.append(pool.submit(read_piece, source, entry_ahead, rows_ahead))
                piece = ahead.popleft().result()
                writer.write(entry, rows, piece)
                bar.update(piece.size * dtype.itemsize)
                if ends[i]:
                    done += 1
                    bar.set_postfix_str(f"{done}/{len(entries)} tensors", refresh=False)
            writer.finish()
        except BaseException:
            for future in ahead:
                future.cancel()
            writer.abort()
            raise
    return total


@contextlib.contextmanager
def atomic_directory(dst: Path) -> Iterator[Path]:
    """A fresh `DST.partial-PID-XXXXXXXX` directory, renamed to `dst` when the block completes
    and removed if it raises (or is interrupted). `dst` must not exist."""
    dst = Path(dst)
    if dst.exists() or dst.is_symlink():
        raise CheckpointError(f"{dst}: already exists (converting never overwrites)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(dst)
    tmp = dst.with_name(f"{dst.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, dst)
        except OSError as e:
            raise CheckpointError(f"{dst}: cannot move the finished checkpoint there ({e})") from e
    except BaseException:
        remove_settled(tmp.parent, glob.escape(tmp.name))
        raise
    hostmem.fsync_path(dst.parent)


def remove_settled(parent: Path, pattern: str, quiet_s: float = 1.0, limit_s: float = 30.0) -> None:
    """Remove what `parent.glob(pattern)` finds until nothing reappears for `quiet_s`.

    A failed Orbax save reports its first failed write while its other writes (TensorStore's,
    off the Python threads, e.g. a `_sharding` file) may still land and recreate a directory
    that one `rmtree` removed, leaving a half-written step behind."""
    start = quiet_since = time.monotonic()
    while time.monotonic() - start < limit_s and time.monotonic() - quiet_since < quiet_s:
        found = list(Path(parent).glob(pattern))
        for path in found:
            shutil.rmtree(path, ignore_errors=True)
        if found:
            quiet_since = time.monotonic()
        time.sleep(0.05)
    if any(Path(parent).glob(pattern)):
        log.warning(
            "%s: %s still reappearing after %.0f s; left in place", parent, pattern, limit_s
        )


def remove_stale_partials(dst: Path) -> None:
    """Remove `DST.partial-PID-*` directories of conversions whose process is gone (killed with
    `kill -9`, which no cleanup survives). (PIDs are this host's: convert writes locally.)"""
    for partial in dst.parent.glob(f"{dst.name}.partial-*"):
        pid = partial.name.rsplit(".partial-", 1)[1].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.warning("removing %s, left by a conversion that was killed", partial)
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:
            pass  # (alive, another user's)
