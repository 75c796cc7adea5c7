"""`l4jax convert SRC DST`: a Llama 4 checkpoint to l4jax or Hugging Face, streaming.

SRC is any of the three formats (`open_checkpoint` detects it: Hugging Face, Meta, l4jax);
DST is an l4jax checkpoint (`L4jaxWriter`) or, with `to="hf"`, a Hugging Face directory
(`HFWriter`). Every tensor goes through the one mapping table (`hf_entries`) in HF layout:
sources read HF tensors (routed experts a few experts at a time, `get_rows`), writers take them,
a reader thread a few pieces ahead of the writer. Host memory holds a few tensors (or expert
pieces) at a time, never the model: HF files are read with positioned reads of exactly the
bytes needed (nothing stays memory-mapped), Meta shards are re-mapped every REMAP_BYTES, and
writes go straight to disk.

DST is built under `DST.partial-PID-XXXXXXXX` and renamed when complete; on any error (or
interrupt) the partial directory is removed. Its metadata and `config.json` are written last,
so even a killed conversion leaves nothing that loads as a checkpoint.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
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
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from l4jax.convert import hostmem
from l4jax.convert.export import HFWriter
from l4jax.convert.hf import TEXT_PREFIX, HFCheckpoint
from l4jax.convert.load import open_checkpoint, source_config
from l4jax.convert.mapping import Entry, TensorSource, check_source, model_entries
from l4jax.convert.multimodal import is_multimodal, multimodal_config, open_multimodal, with_runtime
from l4jax.convert.orbax import L4jaxCheckpoint, L4jaxWriter
from l4jax.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

TARGETS = ("l4jax", "hf")
ROW_PIECE_BYTES = 16 * 2**20  # routed experts are streamed in pieces of about this size
REMAP_BYTES = 2**30  # Meta shards are re-mapped after this much data was read from them
PREFETCH = 1  # pieces read ahead of the one being written
_SAFETENSORS_NUMPY = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
}


class Writer(Protocol):
    def row_block(self, entry: Entry) -> int: ...  # pieces of `entry` are multiples of this
    def write(self, entry: Entry, rows: slice, piece: np.ndarray) -> None: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...


def numpy_dtype(dtype: Any) -> np.dtype:
    """np.dtype of a name or dtype, "bfloat16" included."""
    return np.dtype(jnp.dtype(dtype))


# ---- sources ----------------------------------------------------------------------------------


class StreamingHF:
    """`HFCheckpoint`'s tensors read with positioned reads (`os.preadv`) into fresh arrays.

    safetensors' own reader memory-maps each file (every page a read touches stays in RSS while
    the handle is open) and slices element-wise. A safetensors tensor is one C-ordered byte
    range and its leading rows a contiguous part of it, so reading exactly those bytes keeps
    host memory at what was asked for, at page-cache speed. (Files were validated by
    `HFCheckpoint` through safetensors when the source was checked.)
    """

    def __init__(self, ckpt: HFCheckpoint):
        self._ckpt = ckpt
        self.path = ckpt.path
        self.hf_config, self.keys, self.unused_keys = ckpt.hf_config, ckpt.keys, ckpt.unused_keys
        self.location, self.shape, self.unaccounted = ckpt.location, ckpt.shape, ckpt.unaccounted
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}

    def dtype(self, key: str) -> np.dtype:
        return self._info(key)[2]

    def get(self, key: str) -> np.ndarray:
        return self._read(key, None)

    def get_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        return self._read(key, (start, stop))

    def _read(self, key: str, rows: tuple[int, int] | None) -> np.ndarray:
        file, offset, dtype, shape = self._info(key)
        if rows is not None:
            offset += rows[0] * math.prod(shape[1:]) * dtype.itemsize
            shape = (rows[1] - rows[0], *shape[1:])
        out = hostmem.empty(shape, dtype)
        try:
            hostmem.pread(file, out, offset)
        except OSError as e:
            raise CheckpointError(f"{file}: tensor {key!r} unreadable ({e})") from None
        return out

    def _info(self, key: str) -> tuple[str, int, np.dtype, tuple[int, ...]]:
        """(file, byte offset of the tensor in it, dtype, shape)."""
        file = self.location(key)
        data_start, header = self._header(file)
        info = header.get(key) or header.get(TEXT_PREFIX + key)
        if info is None or info.get("dtype") not in _SAFETENSORS_NUMPY:
            what = "missing" if info is None else f"of dtype {info.get('dtype')}"
            raise CheckpointError(f"{file}: tensor {key!r} {what}")
        return (
            file,
            data_start + info["data_offsets"][0],
            _SAFETENSORS_NUMPY[info["dtype"]],
            tuple(info["shape"]),
        )

    def _header(self, file: str) -> tuple[int, dict[str, Any]]:
        if file not in self._headers:
            try:
                with open(file, "rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    self._headers[file] = (8 + size, json.loads(f.read(size)))
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{file}: unreadable safetensors header ({e})") from None
        return self._headers[file]

    def close(self) -> None:
        self._ckpt.close()


class StreamingMeta:
    """`MetaCheckpoint` re-opened after every REMAP_BYTES read: its shard files are
    memory-mapped, and the pages a read touched stay in RSS until the maps are dropped."""

    def __init__(self, ckpt: Any):
        self.path = ckpt.path
        self._ckpt = ckpt
        self._read_bytes = 0

    def __getattr__(self, name: str) -> Any:  # hf_config, keys, shape, dtype, location, ...
        if name == "_ckpt":
            raise AttributeError(name)
        return getattr(self._ckpt, name)

    def get(self, key: str) -> np.ndarray:
        array = self._ckpt.get(key)  # a copy out of the maps
        self._read_bytes += array.nbytes
        if self._read_bytes >= REMAP_BYTES:
            self._ckpt.close()
            self._ckpt = type(self._ckpt)(self.path, vision=self._ckpt.vision)
            self._read_bytes = 0
        return array

    def close(self) -> None:
        self._ckpt.close()


def open_source(path: str | os.PathLike) -> tuple[TensorSource, str, Any]:
    """Detect the format of `path`; open it for streaming. Returns (source, format name,
    config): a multimodal checkpoint (HF or l4jax `vision_config`, Meta `vision_args`) with
    its vision tower, under HF `Llama4ForConditionalGeneration` names, and its
    `Llama4MultimodalConfig`; a text one with its `Llama4Config`."""
    multimodal = is_multimodal(path)
    ckpt = open_multimodal(path) if multimodal else open_checkpoint(path)
    try:
        if isinstance(ckpt, L4jaxCheckpoint):
            return ckpt, "l4jax", ckpt.config()
        config = multimodal_config(ckpt) if multimodal else source_config(ckpt)
    except BaseException:
        ckpt.close()
        raise
    if isinstance(ckpt, HFCheckpoint):
        return StreamingHF(ckpt), "hf", config
    return StreamingMeta(ckpt), "meta", config


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


# ---- the streaming loop -----------------------------------------------------------------------


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
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    hostmem.fsync_path(dst.parent)


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


@dataclasses.dataclass(frozen=True)
class ConversionResult:
    src: Path
    dst: Path
    src_format: str
    dst_format: str
    dtype: str
    tensors: int
    nbytes: int
    seconds: float
    skipped: tuple[str, ...] = ()  # "FILE: what" of the stored tensors left out

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / 1e6 / max(self.seconds, 1e-9)


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str = "l4jax",
    dtype: Any = None,
    progress: bool = True,
    allow_unexpected: bool = False,
) -> ConversionResult:
    """Convert checkpoint `src` (HF, Meta or l4jax) into a new directory `dst`, streaming.

    `to`: "l4jax" (Orbax params + config.json) or "hf" (sharded safetensors). `dtype`: stored
    dtype (default: the source's, so a round trip is bit-identical). Stored tensors the model
    does not use raise CheckpointError, unless `allow_unexpected`: then they are left out and
    listed in the result's `skipped`.
    """
    if to not in TARGETS:
        raise ConfigError(f"to: expected one of {TARGETS}, got {to!r}")
    src, dst = Path(src), Path(dst)
    if dst.exists() or dst.is_symlink():
        raise CheckpointError(f"{dst}: already exists (converting never overwrites)")
    source, src_format, config = open_source(src)
    try:
        entries = model_entries(config)
        skipped = check_source(source, config, entries, allow_unexpected)
        for line in skipped:
            log.warning("skipped %s", line)
        target = numpy_dtype(dtype) if dtype is not None else source.dtype(entries[0].hf_key)
        name = str(jnp.dtype(target))
        config = with_runtime(config, dtype=name, param_dtype=name)
        kind = "multimodal" if hasattr(config, "vision") else "text"
        log.info("converting %s (%s, %s) to %s (%s, %s)", src, src_format, kind, dst, to, name)
        start = time.perf_counter()
        try:
            with atomic_directory(dst) as tmp:
                writer = (L4jaxWriter if to == "l4jax" else HFWriter)(tmp, config, target)
                desc = f"{src_format} -> {to}"
                nbytes = transfer(source, entries, writer, target, desc, progress)
        except CheckpointError:
            raise
        except OSError as e:  # disk full, permissions, ...
            raise CheckpointError(f"{dst}: write failed ({e})") from e
    finally:
        source.close()
    seconds = time.perf_counter() - start
    return ConversionResult(
        src, dst, src_format, to, name, len(entries), nbytes, seconds, tuple(skipped)
    )
