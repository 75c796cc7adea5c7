"""The l4jax checkpoint format: `config.json` beside `params/`, an Orbax PyTree checkpoint.

    DIR/config.json          the HF config.json (`Llama4Config` or, with a `vision_config`,
                             `Llama4MultimodalConfig`.to_hf_dict(); torch_dtype = stored dtype)
    DIR/params/_METADATA     Orbax's tree metadata: non-OCDBT layout, zarr v2 arrays
    DIR/params/<a.b.c>/      one zarr v2 array per param of the scanned tree (keys joined by
                             "."), raw (uncompressed) chunks of at most CHUNK_BYTES

`params/` has the layout Orbax itself writes with `use_ocdbt=False` (without its `_sharding`
file: restores name their target shardings), so plain Orbax restores it (e.g.
`ocp.StandardCheckpointer().restore(DIR / "params", abstract_tree)`) onto any sharding, each
device reading only the chunks of its slice. `L4jaxWriter` writes it streaming: the arrays are
created empty (by tensorstore) and their chunk files written one layer slice (or a few
experts) at a time, so a stacked param is never materialised. Reading (`L4jaxCheckpoint`,
`restore_params`) also accepts Orbax's default OCDBT layout, i.e. the params item of a training
checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from l4jax.convert import hostmem
from l4jax.convert.mapping import Entry, Slot, get_path, model_entries, param_shapes, set_path
from l4jax.convert.quantized import (
    FIELDS,
    as_qarrays,
    check_mode,
    checkpoint_mode,
    config_dict,
    dequantize_piece,
    qarray_sharding,
    quantize_piece,
    quantized_struct,
    stored_arrays,
)
from l4jax.convert.zarr_layout import (
    array_name,
    array_spec,
    chunk_blocks,
    raw_zarr,
    row_block_of,
    scale_chunks,
    tree_metadata,
    write_json,
    zarr_dtype,
)
from l4jax.errors import CheckpointError, ConfigError, read_json_object
from l4jax.vision_config import model_config, with_runtime

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
METADATA_FILE = "_METADATA"  # Orbax's PyTree metadata (format_utils.PYTREE_METADATA_FILE)
# largest stored chunk: restore reads whole chunks, and tensorstore's per-chunk buffers this
# small are reused by malloc instead of being fresh (page-faulted) memory each time
CHUNK_BYTES = 16 * 2**20
MAX_PENDING_BYTES = 64 * 2**20  # chunk bytes being written (and fsynced) before we wait
WRITE_THREADS = 2

ParamPath = tuple[str, ...]


def is_l4jax_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / PARAMS_DIR / METADATA_FILE).is_file()


def _slot_index(slot: Slot, rows: slice) -> tuple[Any, ...]:
    """Index of a slot's region (HF rows `rows` of it) in its stored array."""
    return (rows,) if slot.group is None else (slot.group, rows)


def chunk_shape(
    shape: tuple[int, ...], itemsize: int, stacked: bool, target: int | None = None
) -> tuple[int, ...]:
    """Chunks of at most `target` bytes, split along the leading axes first.

    A stacked param gets one chunk row per scan group ([1, ...]); each further axis is cut to
    its largest divisor that fits, in order, so chunks are C-contiguous blocks and a write of
    whole leading rows (one layer slice, or a few experts of it) covers whole chunks.
    """
    target = target or CHUNK_BYTES
    chunk = [1, *shape[1:]] if stacked else list(shape)
    for axis in range(int(stacked), len(shape)):
        if math.prod(chunk) * itemsize <= target:
            break
        inner = math.prod(chunk[axis + 1 :]) * itemsize
        fits = max(1, target // inner)
        chunk[axis] = max(d for d in _divisors(shape[axis]) if d <= fits)
    return tuple(chunk)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


# ---- writing ----------------------------------------------------------------------------------


class L4jaxWriter:
    """Streams HF-layout tensors into a new l4jax checkpoint directory `dst`.

    `write(entry, rows, piece)` takes rows `rows` of HF tensor `entry.hf_key` (all rows:
    `slice(None)`), splits them into l4jax slots with the mapping table and writes each slot's
    chunks. The arrays are created (their `.zarray`) by tensorstore; the chunks, whole and raw
    (C-order bytes, zarr v2's `i.j.k` keys), are written here straight from the piece (a chunk
    that is not one contiguous block of it is gathered into a reused buffer first), with
    O_DIRECT where possible (`hostmem.write_file`), and fsynced, by background threads.
    With `quantize` (a mode of `l4jax.quantization`), the weights it quantizes are quantized
    piece by piece and stored as their values and scales (`l4jax.convert.quantized`).
    `finish()` waits for the syncs, then writes Orbax's metadata and `config.json` last: a
    directory whose conversion did not finish has neither.
    """

    def __init__(self, dst: Path, config: Any, dtype: Any, quantize: str | None = None):
        check_mode(config, quantize)
        self.dst = Path(dst)
        self.config = config
        self.quantize = quantize
        self._params_dir = self.dst / PARAMS_DIR
        self._params_dir.mkdir(parents=True)
        self._arrays = stored_arrays(config, dtype, quantize)
        stacked = {s.path: s.group is not None for e in model_entries(config) for s in e.slots}
        context = ts.Context()
        self._chunks: dict[ParamPath, tuple[int, ...]] = {}
        for path, (shape, array_dtype) in self._arrays.items():
            param = path if path in stacked else path[:-1]
            chunks = chunk_shape(shape, array_dtype.itemsize, stacked[param])
            if path[-1] == "scale" and param != path:  # chunked along its values' leading axes
                qvalue = param + ("qvalue",)
                chunks = scale_chunks(shape, self._arrays[qvalue][0], self._chunks[qvalue])
            self._chunks[path] = self._create(path, shape, array_dtype, chunks, context)
        self._writes = hostmem.Writes(WRITE_THREADS, MAX_PENDING_BYTES)

    def _create(
        self, path: ParamPath, shape: tuple[int, ...], dtype: np.dtype, chunks, context
    ) -> tuple[int, ...]:
        """Create the empty array; returns its chunk shape."""
        spec = array_spec(self._params_dir, array_name(path), use_ocdbt=False, use_zarr3=False)
        spec.update(
            metadata={
                "shape": list(shape),
                "chunks": list(chunks),
                "dtype": zarr_dtype(dtype),
                "compressor": None,
                "fill_value": None,
                "order": "C",
                "dimension_separator": ".",
            },
            create=True,
        )
        ts.open(spec, context=context).result()
        return tuple(chunks)

    def row_block(self, entry: Entry) -> int:
        """Rows of `entry` per stored chunk: HF row pieces must be multiples of it."""
        return row_block_of(self._chunks, entry)

    def write(self, entry: Entry, rows: slice, piece: np.ndarray) -> None:
        for slot, part in zip(entry.slots, entry.split(piece)):
            for path, data in quantize_piece(slot.path, part, self.config, self.quantize):
                directory = self._params_dir / array_name(path)
                blocks = chunk_blocks(self._chunks[path], slot, rows, data)
                if blocks is None:
                    raise CheckpointError(f"{directory}: a write of {data.shape} cuts chunks")
                dtype = self._arrays[path][1]
                for key, block in blocks:
                    block = hostmem.contiguous(block, dtype, for_direct_write=True)
                    self._write_file(directory / key, block)

    def _write_file(self, file: Path, data: np.ndarray) -> None:
        self._writes.submit(lambda: hostmem.write_file(file, data), data.nbytes, file)

    def abort(self) -> None:
        self._writes.abort()

    def finish(self) -> None:
        self._writes.close()
        for path in self._arrays:  # the chunk files' directory entries
            hostmem.fsync_path(self._params_dir / array_name(path))
        shapes = {path: shape for path, (shape, _) in self._arrays.items()}
        write_json(self._params_dir / METADATA_FILE, tree_metadata(shapes))
        write_json(self.dst / CONFIG_FILE, config_dict(self.config, self.quantize))
        hostmem.fsync_path(self._params_dir)  # (the array directories and _METADATA)
        hostmem.fsync_path(self.dst)  # (params/ and config.json)


# ---- reading ----------------------------------------------------------------------------------


class L4jaxCheckpoint:
    """An l4jax checkpoint read as a tensor source: HF names and layouts, rows on demand.

    Opening checks `config.json` against the stored arrays (names and shapes); `get` and
    `get_rows` read only the slices of the stored arrays they need, straight into HF layout:
    the chunks of raw zarr v2 arrays (what `L4jaxWriter` writes) with positioned reads of their
    files, other layouts (compressed, OCDBT, zarr3) with tensorstore.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._params_dir = self.path / PARAMS_DIR
        config_file = self.path / CONFIG_FILE
        if not config_file.is_file() or not (self._params_dir / METADATA_FILE).is_file():
            raise CheckpointError(
                f"{self.path}: not an l4jax checkpoint (needs {CONFIG_FILE} and "
                f"{PARAMS_DIR}/{METADATA_FILE})"
            )
        self._hf_config = read_json_object(config_file, CheckpointError)
        try:
            self._config = model_config(self._hf_config)
        except ConfigError as e:
            raise CheckpointError(f"{config_file}: {e}") from None
        # the quantization mode (None: not quantized); a quantized weight reads dequantized
        self.quantization = checkpoint_mode(self._hf_config, config_file)
        self._entries = {e.hf_key: e for e in model_entries(self._config)}
        self._arrays = self._open_arrays()
        first = model_entries(self._config)[0].slots[0].path  # (embeddings: never quantized)
        self._float_dtype = np.dtype(self._arrays[first].dtype.numpy_dtype)
        stored = str(jnp.dtype(self._float_dtype))
        self._config = with_runtime(self._config, dtype=stored, param_dtype=stored)

    def _open_arrays(self) -> dict[ParamPath, Any]:
        metadata_file = self._params_dir / METADATA_FILE
        try:
            metadata = json.loads(metadata_file.read_text())
            stored = [
                tuple(k["key"] for k in leaf["key_metadata"])
                for leaf in metadata["tree_metadata"].values()
            ]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{metadata_file}: malformed Orbax metadata ({e})") from None
        use_ocdbt = metadata.get("use_ocdbt")
        if use_ocdbt is None:
            use_ocdbt = (self._params_dir / "manifest.ocdbt").is_file()
        use_zarr3 = bool(metadata.get("use_zarr3"))
        # every chunk was written (as Orbax): a missing one is an error, not zeros
        every_chunk = bool(metadata.get("store_array_data_equal_to_fill_value"))
        layout = stored_arrays(self._config, np.float32, self.quantization)
        expected = {path: shape for path, (shape, _) in layout.items()}
        missing = [p for p in expected if p not in stored]
        if missing:
            raise CheckpointError(
                f"{self._params_dir}: missing array {array_name(missing[0])!r} "
                f"that {CONFIG_FILE} implies"
            )
        extra = [p for p in stored if p not in expected]
        if extra:
            raise CheckpointError(
                f"{self._params_dir}: unexpected array {array_name(extra[0])!r} for {CONFIG_FILE}"
            )
        # non-OCDBT: one directory per array; one _METADATA does not name is unaccounted
        names = {array_name(p) for p in stored}
        self._unaccounted = [
            f"{self._params_dir / d.name}: array not in {METADATA_FILE}"
            for d in sorted(self._params_dir.iterdir())
            if not use_ocdbt and d.is_dir() and d.name not in names
        ]
        arrays = {}
        self._chunks: dict[ParamPath, tuple[int, ...]] = {}
        self._raw: set[ParamPath] = set()  # arrays of raw chunk files `_read` reads itself
        context = ts.Context()
        param_shapes_ = param_shapes(self._config)
        for path, shape in expected.items():
            name = array_name(path)
            spec = array_spec(self._params_dir, name, use_ocdbt, use_zarr3)
            spec["fill_missing_data_reads"] = not every_chunk
            try:
                array = ts.open(spec, open=True, read=True, context=context).result()
            except ValueError as e:
                raise CheckpointError(
                    f"{self._params_dir / name}: unreadable array ({e})"
                ) from None
            if tuple(array.shape) != shape:
                raise CheckpointError(
                    f"{self._params_dir / name}: array has shape {tuple(array.shape)}, "
                    f"{CONFIG_FILE} implies {shape}"
                )
            want = layout[path][1]
            if path[-1] in FIELDS and path not in param_shapes_ and array.dtype.numpy_dtype != want:
                raise CheckpointError(
                    f"{self._params_dir / name}: {array.dtype.numpy_dtype} array, "
                    f"{self.quantization} stores {want}"
                )
            arrays[path] = array
            self._chunks[path] = tuple(array.chunk_layout.read_chunk.shape)
            meta = array.spec().to_json().get("metadata", {})
            raw = raw_zarr(meta, array.dtype.numpy_dtype)
            if every_chunk and not (use_ocdbt or use_zarr3) and raw:  # (else: fill values)
                self._raw.add(path)
        return arrays

    def row_block(self, entry: Entry) -> int:
        """HF rows of `entry` per stored chunk: row pieces of multiples of it read whole chunks."""
        return row_block_of(self._chunks, entry)

    def config(self, **runtime: Any) -> Any:
        """The stored config (`Llama4Config`, or `Llama4MultimodalConfig` when config.json has a
        `vision_config`); `param_dtype` (and `dtype`) are the stored arrays' dtype."""
        return with_runtime(self._config, **runtime) if runtime else self._config

    def hf_config(self) -> dict[str, Any]:
        return dict(self._hf_config)

    def keys(self) -> list[str]:
        return list(self._entries)

    def unused_keys(self) -> list[str]:
        return []

    def unaccounted(self) -> list[str]:
        return list(self._unaccounted)

    def location(self, key: str) -> str:
        slots = self._entry(key).slots
        return ", ".join(str(self._params_dir / array_name(s.path)) for s in slots)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key).hf_shape

    def dtype(self, key: str) -> np.dtype:
        """The stored dtype of `key` (of a quantized weight: the dtype it reads dequantized in)."""
        path = self._entry(key).slots[0].path
        if path not in self._arrays:
            return self._float_dtype
        return np.dtype(self._arrays[path].dtype.numpy_dtype)

    def get(self, key: str) -> np.ndarray:
        return self._read(key, slice(None))

    def get_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a routed-expert tensor (its split/join act per expert)."""
        return self._read(key, slice(start, stop))

    def _entry(self, key: str) -> Entry:
        if key not in self._entries:
            raise CheckpointError(f"{self.path}: no tensor {key!r}")
        return self._entries[key]

    def _read(self, key: str, rows: slice) -> np.ndarray:
        """HF tensor `key` (its `rows`), read by tensorstore straight into place: every layout's
        `split` of an HF array is a view of it, and each slot's region is copied into its view."""
        entry = self._entry(key)
        start, stop, _ = rows.indices(entry.hf_shape[0])
        out = hostmem.empty((stop - start, *entry.hf_shape[1:]), self.dtype(key))
        views = entry.split(out)
        copies = []
        for slot, view in zip(entry.slots, views):
            if not np.may_share_memory(view, out):  # a copy: the mapping's layouts never make one
                raise CheckpointError(f"{key}: its layout splits into copies, not views")
            if slot.path not in self._arrays:  # quantized
                view[...] = self._read_dequantized(slot, rows, key)
                continue
            blocks = chunk_blocks(self._chunks[slot.path], slot, rows, view)
            if slot.path in self._raw and blocks is not None:
                self._read_chunks(slot, blocks, key)
                continue
            stored = self._arrays[slot.path][_slot_index(slot, rows)].translate_to[0]
            copies.append((slot, ts.array(view, copy=False, write=True).write(stored)))
        for slot, future in copies:  # (read concurrently)
            try:
                future.result()
            except ValueError as e:
                where = self._params_dir / array_name(slot.path)
                raise CheckpointError(f"{where}: unreadable data for {key!r} ({e})") from None
        return out

    def _read_dequantized(self, slot: Slot, rows: slice, key: str) -> np.ndarray:
        """The weights of a quantized slot's region, dequantized to the checkpoint's dtype."""
        parts = []
        for field in FIELDS:
            path = slot.path + (field,)
            try:
                parts.append(self._arrays[path][_slot_index(slot, rows)].read().result())
            except ValueError as e:
                where = self._params_dir / array_name(path)
                raise CheckpointError(f"{where}: unreadable data for {key!r} ({e})") from None
        return dequantize_piece(*parts, self._float_dtype)

    def _read_chunks(self, slot: Slot, blocks: Iterator[tuple[str, np.ndarray]], key: str):
        """Read each chunk file into its block (a strided block: copied out of the file's map)."""
        directory = self._params_dir / array_name(slot.path)
        for name, block in blocks:
            try:
                if block.flags.c_contiguous:
                    hostmem.pread(directory / name, block, size=block.nbytes)
                else:
                    data = hostmem.map_file(directory / name, block.nbytes)
                    block[...] = data.view(block.dtype).reshape(block.shape)
            except OSError as e:
                what = f"{directory / name}: unreadable chunk of {key!r} ({e})"
                raise CheckpointError(what) from None

    def close(self) -> None:
        self._arrays.clear()


def restore_params(
    path: str | os.PathLike,
    shardings: Any = None,
    *,
    dtype: Any = None,
    text_only: bool = False,
    **runtime: Any,
) -> tuple[Any, dict[str, Any]]:
    """Restore an l4jax checkpoint with Orbax as `(config, params)` (a multimodal checkpoint:
    `(Llama4MultimodalConfig, {"language_model": ..., "vision_model": ..., ...})`).

    `shardings`: None (every param on the first device), one `jax.sharding.Sharding` for all
    params, or a tree of them shaped like the params; each device reads only its slice. A
    quantized checkpoint (`l4jax convert --quantize`) restores its quantized weights as
    `QArray`s; their tree entry is a `QArray` of two shardings or the weight's one (the scale
    then gets the same mesh axes except on its size-1 dims).
    `dtype`: stored dtype of the restored params (default: the checkpoint's), also the config's
    compute dtype unless `runtime` says otherwise; other runtime fields pass to the config.
    `text_only`: of a multimodal checkpoint, the text model alone, `(config.text,
    params["language_model"])` (the vision arrays are not read).
    """
    import orbax.checkpoint as ocp

    ckpt = L4jaxCheckpoint(path)
    stored = ckpt.dtype(ckpt.keys()[0])
    name = str(jnp.dtype(dtype if dtype is not None else stored))
    config = ckpt.config(**{"dtype": name, "param_dtype": name, **runtime})
    mode = ckpt.quantization
    stray = ckpt.unaccounted()
    ckpt.close()
    if stray:
        more = f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""
        raise CheckpointError(f"{stray[0]}{more}: not a param of this config")
    prefix: ParamPath = ()
    if text_only and hasattr(config, "vision"):
        config, prefix = config.text, ("language_model",)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args: dict[str, Any] = {}
    for param, shape in param_shapes(config).items():
        sharding = _sharding_of(shardings, param)
        q = quantized_struct(param, shape, name, config, mode)
        if q is None:
            args = ocp.ArrayRestoreArgs(
                sharding=sharding, global_shape=shape, dtype=jnp.dtype(name)
            )
            set_path(restore_args, prefix + param, args)
            continue
        sharding = qarray_sharding(sharding, q)
        for field in FIELDS:
            leaf = getattr(q, field)
            args = ocp.ArrayRestoreArgs(
                sharding=getattr(sharding, field), global_shape=leaf.shape, dtype=leaf.dtype
            )
            set_path(restore_args, prefix + param + (field,), args)
    params_dir = Path(path).absolute() / PARAMS_DIR
    partial = {"item": restore_args, "partial_restore": True} if prefix else {}
    restore = ocp.args.PyTreeRestore(restore_args=restore_args, **partial)
    try:
        params = ocp.PyTreeCheckpointer().restore(params_dir, args=restore)
    except Exception as e:  # Orbax/tensorstore failures (missing chunks, I/O) in many types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{params_dir}: restore failed ({reason})") from e
    return config, as_qarrays(get_path(params, prefix), config, mode)


def _sharding_of(shardings: Any, param: ParamPath) -> Any:
    """The sharding of `param` (of a quantized one: one for the weight, or a `QArray` of two)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return shardings
    try:
        return get_path(shardings, param)
    except (KeyError, TypeError):
        raise CheckpointError(f"shardings: no sharding for param {array_name(param)!r}") from None
