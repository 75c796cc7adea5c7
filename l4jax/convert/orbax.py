"""The l4jax checkpoint format: `config.json` beside `params/`, an Orbax PyTree checkpoint.

    DIR/config.json          Llama4Config.to_hf_dict() (HF format; torch_dtype = stored dtype)
    DIR/params/_METADATA     Orbax's tree metadata: non-OCDBT layout, zarr v2 arrays
    DIR/params/<a.b.c>/      one zarr v2 array per param of the scanned tree (keys joined by
                             "."), raw (uncompressed) chunks of at most CHUNK_BYTES

`params/` has the layout Orbax itself writes with `use_ocdbt=False` (without its `_sharding`
file: restores name their target shardings), so plain Orbax restores it (e.g.
`ocp.StandardCheckpointer().restore(DIR / "params", abstract_tree)`) onto any sharding, each
device reading only the chunks of its slice. `L4jaxWriter` writes it streaming: the arrays are
created empty and filled with tensorstore one layer slice (or a few experts) at a time, so a
stacked param is never materialised. Reading (`L4jaxCheckpoint`, `restore_params`) also accepts
Orbax's default OCDBT layout, i.e. the params item of a training checkpoint.
"""

from __future__ import annotations

import collections
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tensorstore as ts

from l4jax.config import Llama4Config
from l4jax.convert.mapping import Entry, Slot, get_path, hf_entries, param_shapes, set_path
from l4jax.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
METADATA_FILE = "_METADATA"  # Orbax's PyTree metadata (format_utils.PYTREE_METADATA_FILE)
# largest stored chunk: restore reads whole chunks, and tensorstore's per-chunk buffers this
# small are reused by malloc instead of being fresh (page-faulted) memory each time
CHUNK_BYTES = 16 * 2**20
MAX_PENDING_BYTES = 128 * 2**20  # tensorstore writes in flight before we wait for one
_DICT_KEY = 2  # Orbax's KeyType.DICT in _METADATA

ParamPath = tuple[str, ...]


def is_l4jax_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / PARAMS_DIR / METADATA_FILE).is_file()


def array_name(path: ParamPath) -> str:
    """Orbax's on-disk name of a param: its dict keys joined by '.'."""
    return ".".join(path)


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


def zarr_dtype(dtype: Any) -> str:
    dtype = np.dtype(dtype)
    return "bfloat16" if dtype == ml_dtypes.bfloat16 else dtype.str


def _array_spec(params_dir: Path, name: str, use_ocdbt: bool, use_zarr3: bool) -> dict[str, Any]:
    """The tensorstore spec Orbax uses for param `name` (both of its layouts)."""
    if use_ocdbt:
        kvstore = {"driver": "ocdbt", "base": f"file://{params_dir}", "path": name}
    else:
        kvstore = {"driver": "file", "path": str(params_dir / name)}
    return {"driver": "zarr3" if use_zarr3 else "zarr", "kvstore": kvstore}


def _slot_index(slot: Slot, rows: slice) -> tuple[Any, ...]:
    """Index of a slot's region (HF rows `rows` of it) in its stored array."""
    return (rows,) if slot.group is None else (slot.group, rows)


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


# ---- writing ----------------------------------------------------------------------------------


class L4jaxWriter:
    """Streams HF-layout tensors into a new l4jax checkpoint directory `dst`.

    `write(entry, rows, piece)` takes rows `rows` of HF tensor `entry.hf_key` (all rows:
    `slice(None)`), splits them into l4jax slots with the mapping table and writes each into
    its stored array. `finish()` waits for the writes, then writes Orbax's metadata and
    `config.json` last: a directory whose conversion did not finish has neither.
    """

    def __init__(self, dst: Path, config: Llama4Config, dtype: Any):
        self.dst = Path(dst)
        self.config = config
        self.dtype = np.dtype(dtype)
        self._params_dir = self.dst / PARAMS_DIR
        self._params_dir.mkdir(parents=True)
        self._shapes = param_shapes(config)
        self._stacked = {s.path: s.group is not None for e in hf_entries(config) for s in e.slots}
        context = ts.Context()
        self._arrays = {
            path: self._create(path, shape, context) for path, shape in self._shapes.items()
        }
        self._pending: collections.deque[tuple[Any, int, str]] = collections.deque()
        self._pending_bytes = 0

    def _create(self, path: ParamPath, shape: tuple[int, ...], context: ts.Context) -> Any:
        spec = _array_spec(self._params_dir, array_name(path), use_ocdbt=False, use_zarr3=False)
        chunks = chunk_shape(shape, self.dtype.itemsize, self._stacked[path])
        spec.update(
            metadata={
                "shape": list(shape),
                "chunks": list(chunks),
                "dtype": zarr_dtype(self.dtype),
                "compressor": None,
                "fill_value": None,
            },
            create=True,
            # as Orbax: write every chunk, so a chunk missing on restore is an error
            store_data_equal_to_fill_value=True,
        )
        return ts.open(spec, context=context).result()

    def row_block(self, entry: Entry) -> int:
        """Rows of `entry` per stored chunk: HF row pieces must be multiples of it."""
        blocks = []
        for slot in entry.slots:
            array = self._arrays[slot.path]
            axis = 0 if slot.group is None else 1
            blocks.append(array.chunk_layout.write_chunk.shape[axis])
        return math.lcm(*blocks)

    def write(self, entry: Entry, rows: slice, piece: np.ndarray) -> None:
        for slot, part in zip(entry.slots, entry.split(piece)):
            view = self._arrays[slot.path][_slot_index(slot, rows)]
            data = part.astype(self.dtype, copy=False)  # never modified: tensorstore may keep it
            self._submit(
                view.write(data, can_reference_source_data_indefinitely=True), data.nbytes, slot
            )

    def _submit(self, future: Any, nbytes: int, slot: Slot) -> None:
        self._pending.append((future, nbytes, array_name(slot.path)))
        self._pending_bytes += nbytes
        while self._pending_bytes > MAX_PENDING_BYTES:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        future, nbytes, name = self._pending.popleft()
        try:
            future.result()
        except Exception as e:  # tensorstore reports I/O failures as ValueError/OSError
            raise CheckpointError(f"{self._params_dir / name}: write failed ({e})") from None
        self._pending_bytes -= nbytes

    def abort(self) -> None:
        """Wait out the writes in flight (so nothing lands after the directory is removed)."""
        while self._pending:
            future, _, _ = self._pending.popleft()
            try:
                future.result()
            except Exception:  # the conversion is failing already; its error is reported
                pass
        self._pending_bytes = 0

    def finish(self) -> None:
        while self._pending:
            self._wait_oldest()
        _write_json(self._params_dir / METADATA_FILE, tree_metadata(self._shapes))
        _write_json(self.dst / CONFIG_FILE, self.config.to_hf_dict())


def tree_metadata(shapes: dict[ParamPath, tuple[int, ...]]) -> dict[str, Any]:
    """Orbax's `_METADATA` for a tree of jax.Arrays saved without OCDBT in zarr v2."""
    tree = {
        str(path): {
            "key_metadata": [{"key": key, "key_type": _DICT_KEY} for key in path],
            "value_metadata": {
                "value_type": "jax.Array",
                "skip_deserialize": False,
                "write_shape": list(shape),
            },
        }
        for path, shape in shapes.items()
    }
    return {
        "tree_metadata": tree,
        "use_ocdbt": False,
        "use_zarr3": False,
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": None,
    }


# ---- reading ----------------------------------------------------------------------------------


class L4jaxCheckpoint:
    """An l4jax checkpoint read as a tensor source: HF names and layouts, rows on demand.

    Opening checks `config.json` against the stored arrays (names and shapes); `get` and
    `get_rows` read only the slices of the stored arrays they need, straight into HF layout.
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
        try:
            self._config = Llama4Config.from_json_file(config_file)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        self._hf_config = json.loads(config_file.read_text())
        self._entries = {e.hf_key: e for e in hf_entries(self._config)}
        self._arrays = self._open_arrays()
        stored = str(jnp.dtype(self.dtype("model.embed_tokens.weight")))
        self._config = self._config.replace(dtype=stored, param_dtype=stored)

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
        expected = param_shapes(self._config)
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
        arrays = {}
        context = ts.Context()
        for path, shape in expected.items():
            name = array_name(path)
            spec = _array_spec(self._params_dir, name, use_ocdbt, use_zarr3)
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
            arrays[path] = array
        return arrays

    def config(self, **runtime: Any) -> Llama4Config:
        """The stored config; `param_dtype` (and `dtype`) are the stored arrays' dtype."""
        return self._config.replace(**runtime) if runtime else self._config

    def hf_config(self) -> dict[str, Any]:
        return dict(self._hf_config)

    def keys(self) -> list[str]:
        return list(self._entries)

    def unused_keys(self) -> list[str]:
        return []

    def location(self, key: str) -> str:
        slots = self._entry(key).slots
        return ", ".join(str(self._params_dir / array_name(s.path)) for s in slots)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key).hf_shape

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self._arrays[self._entry(key).slots[0].path].dtype.numpy_dtype)

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
        out = np.empty((stop - start, *entry.hf_shape[1:]), self.dtype(key))
        views = entry.split(out)
        copies = []
        for slot, view in zip(entry.slots, views):
            if not np.may_share_memory(view, out):  # a copy: the mapping's layouts never make one
                raise CheckpointError(f"{key}: its layout splits into copies, not views")
            stored = self._arrays[slot.path][_slot_index(slot, rows)].translate_to[0]
            copies.append(ts.array(view, copy=False, write=True).write(stored))
        for slot, future in zip(entry.slots, copies):  # (read concurrently)
            try:
                future.result()
            except ValueError as e:
                where = self._params_dir / array_name(slot.path)
                raise CheckpointError(f"{where}: unreadable data for {key!r} ({e})") from None
        return out

    def close(self) -> None:
        self._arrays.clear()


def restore_params(
    path: str | os.PathLike, shardings: Any = None, *, dtype: Any = None, **runtime: Any
) -> tuple[Llama4Config, dict[str, Any]]:
    """Restore an l4jax checkpoint with Orbax as `(config, params)`.

    `shardings`: None (every param on the first device), one `jax.sharding.Sharding` for all
    params, or a tree of them shaped like the params; each device reads only its slice.
    `dtype`: stored dtype of the restored params (default: the checkpoint's), also the config's
    compute dtype unless `runtime` says otherwise; other runtime fields pass to the config.
    """
    import orbax.checkpoint as ocp

    ckpt = L4jaxCheckpoint(path)
    name = str(jnp.dtype(dtype)) if dtype is not None else ckpt.config().param_dtype
    config = ckpt.config(**{"dtype": name, "param_dtype": name, **runtime})
    shapes = param_shapes(config)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args: dict[str, Any] = {}
    for param, shape in shapes.items():
        sharding = _sharding_of(shardings, param)
        args = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=shape, dtype=jnp.dtype(name))
        set_path(restore_args, param, args)
    ckpt.close()
    params_dir = Path(path).absolute() / PARAMS_DIR
    restore = ocp.args.PyTreeRestore(restore_args=restore_args)
    try:
        params = ocp.PyTreeCheckpointer().restore(params_dir, args=restore)
    except Exception as e:  # Orbax/tensorstore failures (missing chunks, I/O) in many types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{params_dir}: restore failed ({reason})") from e
    return config, params


def _sharding_of(shardings: Any, param: ParamPath) -> jax.sharding.Sharding:
    if isinstance(shardings, jax.sharding.Sharding):
        return shardings
    try:
        return get_path(shardings, param)
    except (KeyError, TypeError):
        raise CheckpointError(f"shardings: no sharding for param {array_name(param)!r}") from None
