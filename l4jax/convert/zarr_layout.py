"""The on-disk layout of an l4jax checkpoint's `params/`: Orbax's PyTree layout without OCDBT,
one zarr v2 array per stored array, raw C-order chunks (`orbax.py` writes and reads it).

Shared by the writer and the reader: array names, chunk shapes (a quantized weight's scale
chunked along its values' leading axes), which chunk files a region of rows covers, and
Orbax's `_METADATA`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from l4jax.convert.mapping import Entry, Slot
from l4jax.convert.quantized import FIELDS

_DICT_KEY = 2  # Orbax's KeyType.DICT in _METADATA

ParamPath = tuple[str, ...]


def array_name(path: ParamPath) -> str:
    """Orbax's on-disk name of a param: its dict keys joined by '.'."""
    return ".".join(path)


def zarr_dtype(dtype: Any) -> str:
    """zarr v2's dtype string; tensorstore's names for ml_dtypes' (bfloat16, float8_e4m3fn)."""
    dtype = np.dtype(dtype)
    return dtype.name if dtype.type.__module__.startswith("ml_dtypes") else dtype.str


def array_spec(params_dir: Path, name: str, use_ocdbt: bool, use_zarr3: bool) -> dict[str, Any]:
    """The tensorstore spec Orbax uses for param `name` (both of its layouts)."""
    if use_ocdbt:
        kvstore = {"driver": "ocdbt", "base": f"file://{params_dir.absolute()}", "path": name}
    else:
        kvstore = {"driver": "file", "path": str(params_dir.absolute() / name)}
    return {"driver": "zarr3" if use_zarr3 else "zarr", "kvstore": kvstore}


def write_json(path: Path, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def scale_chunks(shape, qshape, qchunks) -> tuple[int, ...]:
    """A scale array's chunks: its values' chunks on the leading (layer, expert) axes they
    share, so a write of whole experts covers whole chunks of both; whole elsewhere."""
    lead = len(shape) - 2
    return tuple(
        c if i < lead and n == qn else n for i, (n, qn, c) in enumerate(zip(shape, qshape, qchunks))
    )


def stored_of(chunks: dict[ParamPath, Any], path: ParamPath) -> list[ParamPath]:
    """The stored arrays of param `path`: itself, or its quantized values and scales."""
    return [path] if path in chunks else [path + (field,) for field in FIELDS]


def row_block_of(chunks: dict[ParamPath, tuple[int, ...]], entry: Entry) -> int:
    """HF rows of `entry` per stored chunk (the lcm over its slots' arrays)."""
    return math.lcm(
        *(
            chunks[array][int(s.group is not None)]
            for s in entry.slots
            for array in stored_of(chunks, s.path)
        )
    )


def chunk_blocks(
    chunk: tuple[int, ...], slot: Slot, rows: slice, part: np.ndarray
) -> Iterator[tuple[str, np.ndarray]] | None:
    """(zarr v2 chunk key `i.j.k`, the view of `part` it holds) for each chunk of the region
    (HF rows `rows` of `slot`) that `part` fills; None when the region cuts chunks."""
    origin = [rows.start or 0] + [0] * (part.ndim - 1)
    if slot.group is not None:
        part, origin = part[None], [slot.group, *origin]
    if any(o % c or n % c for o, n, c in zip(origin, part.shape, chunk)):
        return None
    return (
        (
            ".".join(str(o // c + i) for o, c, i in zip(origin, chunk, index)),
            part[tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunk))],
        )
        for index in np.ndindex(*(n // c for n, c in zip(part.shape, chunk)))
    )


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


def raw_zarr(meta: dict[str, Any], dtype: np.dtype) -> bool:
    """zarr v2 metadata of raw C-order chunk files under `i.j.k` keys, in this host's order."""
    return (
        meta.get("zarr_format") == 2
        and meta.get("compressor") is None
        and not meta.get("filters")
        and meta.get("order", "C") == "C"
        and meta.get("dimension_separator", ".") == "."
        and meta.get("dtype") == zarr_dtype(dtype)
        and sys.byteorder == "little"
    )
