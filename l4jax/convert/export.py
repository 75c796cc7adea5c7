"""Export to Hugging Face: sharded safetensors + `model.safetensors.index.json` + `config.json`.

`HFWriter` streams tensors into safetensors files whose headers are planned up front from the
config (every name, shape, dtype and offset is known before any data is read), so each file
is written front to back, a tensor (or a few experts of one) at a time. `export_hf` exports an
in-memory param tree (e.g. from training); `l4jax convert SRC DST --to hf` exports any
checkpoint (HF, Meta, l4jax) the same way. transformers' `Llama4ForCausalLM.from_pretrained`
loads the result.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from l4jax.convert import hostmem
from l4jax.convert.hf import INDEX_FILE
from l4jax.convert.mapping import Entry, get_path, model_entries, param_shapes
from l4jax.convert.streaming import atomic_directory, transfer
from l4jax.errors import CheckpointError
from l4jax.vision_config import with_runtime

SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")
STAGE_BYTES = 16 * 2**20  # direct writes of this many bytes (a multiple of hostmem.ALIGN)
WRITE_THREADS = 2
_SAFETENSORS_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
}


def safetensors_dtype(dtype: Any) -> str:
    dtype = np.dtype(dtype)
    if dtype not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"cannot export dtype {dtype} (float32, bfloat16 or float16)")
    return _SAFETENSORS_DTYPES[dtype]


@dataclasses.dataclass(frozen=True)
class _Planned:
    key: str
    shape: tuple[int, ...]
    begin: int  # byte offsets in the file's data section
    end: int


@dataclasses.dataclass
class _File:
    name: str
    tensors: list[_Planned]

    def header(self, dtype: str) -> bytes:
        """The safetensors header: u64 length, JSON padded with spaces so that the data starts
        at a multiple of hostmem.ALIGN (the format asks for 8), where direct writes can."""
        meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        for t in self.tensors:
            meta[t.key] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [t.begin, t.end]}
        text = json.dumps(meta, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % hostmem.ALIGN)
        return len(text).to_bytes(8, "little") + text


def plan_files(entries: list[Entry], itemsize: int, max_bytes: int) -> list[_File]:
    """Tensors in entry order, packed into files of at most `max_bytes` (a bigger tensor
    gets a file of its own), named as transformers names them."""
    groups: list[list[_Planned]] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry.hf_shape) * itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(_Planned(entry.hf_key, entry.hf_shape, size, size + nbytes))
        size += nbytes
    n = len(groups)
    return [_File(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


class HFWriter:
    """Streams HF tensors, in `model_entries` order, into a new HF checkpoint directory `dst`
    (a `Llama4ForCausalLM` one, or `Llama4ForConditionalGeneration` for a multimodal config).

    `write(entry, rows, piece)` appends rows `rows` of tensor `entry.hf_key` (consecutive
    pieces, front to back); `finish()` closes the last file and writes the index and
    `config.json` last, so an unfinished directory is never taken for a checkpoint. The data
    goes through a STAGE_BYTES buffer written with O_DIRECT (the header, and a file's last
    partial block, through the page cache), or straight through the page cache where the
    filesystem has no direct I/O.
    """

    def __init__(self, dst: Path, config: Any, dtype: Any, max_shard_bytes: int = SHARD_BYTES):
        self.dst = Path(dst)
        self.dtype = np.dtype(dtype)
        self.config = with_runtime(config, param_dtype=str(jnp.dtype(self.dtype)))
        self._st_dtype = safetensors_dtype(self.dtype)
        entries = model_entries(config)
        self._files = plan_files(entries, self.dtype.itemsize, max_shard_bytes)
        self._where = {t.key: (i, t) for i, f in enumerate(self._files) for t in f.tensors}
        self._file_index = -1
        self._fd: int | None = None
        self._direct: int | None = None  # O_DIRECT descriptor of the same file
        self._data_start = 0  # file offset of the data section (a multiple of hostmem.ALIGN)
        self._offset = 0  # bytes written into the current file's data section
        self._stage = hostmem.empty((STAGE_BYTES,), np.uint8, aligned=True)
        self._staged = 0  # bytes in the stage: the data section's last ones
        self._writes = hostmem.Writes(WRITE_THREADS, 2 * STAGE_BYTES)

    def row_block(self, entry: Entry) -> int:
        return 1

    def write(self, entry: Entry, rows: slice, piece: np.ndarray) -> None:
        index, planned = self._where[entry.hf_key]
        while self._file_index < index:
            self._next_file()
        start = rows.start or 0
        row_bytes = math.prod(entry.hf_shape[1:]) * self.dtype.itemsize
        if planned.begin + start * row_bytes != self._offset:
            raise CheckpointError(f"{entry.hf_key}: pieces out of order for {self._path()}")
        data = hostmem.contiguous(piece, self.dtype).reshape(-1).view(np.uint8)
        if self._direct is None:
            hostmem.pwrite(self._fd, data, self._data_start + self._offset)
            self._offset += data.size
            return
        while data.size:  # (through the stage, flushed whenever full)
            n = min(len(self._stage) - self._staged, data.size)
            self._stage[self._staged : self._staged + n] = data[:n]
            self._staged, self._offset, data = self._staged + n, self._offset + n, data[n:]
            if self._staged == len(self._stage):
                self._flush_stage()

    def _flush_stage(self) -> None:
        """Write the stage in the background (its whole blocks directly, the rest, at a file's
        end, buffered) and start a new one."""
        at = self._data_start + self._offset - self._staged
        whole = self._staged // hostmem.ALIGN * hostmem.ALIGN
        stage, staged, fd, direct = self._stage, self._staged, self._fd, self._direct

        def write() -> None:
            hostmem.pwrite_direct(direct, fd, stage[:whole], at)
            hostmem.pwrite(fd, stage[whole:staged], at + whole)

        self._writes.submit(write, staged, self._path())
        self._stage = hostmem.empty((STAGE_BYTES,), np.uint8, aligned=True)
        self._staged = 0

    def _path(self) -> Path:
        return self.dst / self._files[self._file_index].name

    def _next_file(self) -> None:
        self._close_file()
        self._file_index += 1
        self._fd = os.open(self._path(), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        header = self._files[self._file_index].header(self._st_dtype)
        hostmem.pwrite(self._fd, header, 0)
        self._direct = hostmem.open_direct(self._path())
        self._data_start, self._offset = len(header), 0

    def _close_file(self) -> None:
        if self._fd is None:
            return
        expected = self._files[self._file_index].tensors[-1].end
        if self._offset != expected:
            raise CheckpointError(f"{self._path()}: {self._offset} of {expected} bytes written")
        if self._direct is not None:
            self._flush_stage()
            self._writes.wait()
        os.fsync(self._fd)
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._fd, self._direct):
            if fd is not None:
                os.close(fd)
        self._fd = self._direct = None

    def finish(self) -> None:
        if self._file_index != len(self._files) - 1:
            missing = self._files[self._file_index + 1].name
            raise CheckpointError(f"{self.dst / missing}: planned but never written")
        self._close_file()
        self._writes.close()
        weight_map = {t.key: f.name for f in self._files for t in f.tensors}
        total = sum(f.tensors[-1].end for f in self._files)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(self.dst / INDEX_FILE, index)
        _write_json(self.dst / "config.json", hf_config_dict(self.config))

    def abort(self) -> None:
        self._writes.abort()
        self._close_fds()


def hf_config_dict(config: Any) -> dict[str, Any]:
    """`config.json` for transformers: special token ids outside the vocabulary (Llama 4's
    defaults on a small test model, e.g. from a Meta params.json) are written as null, which
    transformers requires."""
    hf = config.to_hf_dict()
    text = hf.get("text_config", hf)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = text[name] if isinstance(text[name], list) else [text[name]]
        if any(i is not None and not 0 <= i < text["vocab_size"] for i in ids):
            text[name] = None
    return hf


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


# ---- in-memory params as a tensor source ------------------------------------------------------


class ParamsSource:
    """An in-memory (device or host) scanned param tree read as HF tensors, slice by slice.

    Only the slices a tensor needs are copied to the host (`params[...][group]`), so an export
    from device memory holds one tensor (or a few experts of one) on the host at a time.
    """

    def __init__(self, params: dict[str, Any], config: Any):
        self.params = params
        self._config = config
        self._entries = {e.hf_key: e for e in model_entries(config)}
        for path, shape in param_shapes(config).items():
            try:
                leaf = get_path(params, path)
            except (KeyError, TypeError):
                raise CheckpointError(f"params: missing param {'.'.join(path)!r}") from None
            if tuple(leaf.shape) != shape:
                raise CheckpointError(
                    f"params: {'.'.join(path)!r} has shape {tuple(leaf.shape)}, "
                    f"config expects {shape}"
                )

    def hf_config(self) -> dict[str, Any]:
        return self._config.to_hf_dict()

    def keys(self) -> list[str]:
        return list(self._entries)

    def unaccounted(self) -> list[str]:
        return []

    def location(self, key: str) -> str:
        return "params: " + ", ".join(".".join(s.path) for s in self._entries[key].slots)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].hf_shape

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(get_path(self.params, self._entries[key].slots[0].path).dtype)

    def get(self, key: str) -> np.ndarray:
        return self._read(key, slice(None))

    def get_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        return self._read(key, slice(start, stop))

    def _read(self, key: str, rows: slice) -> np.ndarray:
        entry = self._entries[key]
        parts = []
        for slot in entry.slots:
            leaf = get_path(self.params, slot.path)
            index = (rows,) if slot.group is None else (slot.group, rows)
            parts.append(np.asarray(jax.device_get(leaf[index])))
        return entry.join(tuple(parts))


def export_hf(
    params: dict[str, Any],
    config: Any,
    dst: str | os.PathLike,
    dtype: Any = None,
    max_shard_bytes: int = SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Write an in-memory scanned param tree as a Hugging Face checkpoint directory `dst`:
    `config` a `Llama4Config` (a `Llama4ForCausalLM` checkpoint) or a `Llama4MultimodalConfig`
    (`Llama4ForConditionalGeneration`, params `{"language_model", "vision_model",
    "multi_modal_projector"}`).

    `dtype`: stored dtype (default: the params' own). Written under a temporary name and
    renamed when complete; `dst` must not exist. Returns `dst`.
    """
    source = ParamsSource(params, config)
    entries = model_entries(config)
    target = np.dtype(dtype) if dtype is not None else source.dtype(entries[0].hf_key)
    with atomic_directory(Path(dst)) as tmp:
        writer = HFWriter(tmp, config, target, max_shard_bytes)
        transfer(source, entries, writer, target, desc="export hf", progress=progress)
    return Path(dst)
