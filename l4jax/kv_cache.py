"""The KV cache of generation: one `{"k", "v"}` pair of [G, B, S, K, H] arrays per scan slot.

G layer groups (as the params), B rows, S slots, K kv heads, H head_dim. NoPE/global layers
keep every index (S = the longest sequence); chunked RoPE layers keep a ring of
S = min(attention_chunk_size, longest) slots, because a query never looks back past the start
of its chunk (`chunk_aware`). `l4jax.decoding` fills and reads it through the model's
`cache=` argument. Stored in the compute dtype, or as int8 (`QArray`s: values and one fp32
scale per token and kv head), about half of bfloat16's bytes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from l4jax.config import Llama4Config
from l4jax.errors import ConfigError
from l4jax.model import kv_cache_axes
from l4jax.quantization import QArray

Array = jax.Array

# the cache's storage: the compute dtypes, or int8 values with one fp32 scale per (token, kv
# head) (half of bfloat16's bytes plus 4 / head_dim: 0.52x for head_dim 128)
KV_CACHE_DTYPES = ("float32", "bfloat16", "int8")


def cache_lengths(
    config: Llama4Config, max_len: int, chunk_aware: bool = True, multiple: int = 1
) -> tuple[int, ...]:
    """Slots S per scan slot: min(chunk, max_len) for chunked layers, max_len for the others,
    rounded up to a multiple of `multiple` (the sequence shards a global cache is split into;
    the extra slots are never written, so never visible)."""
    kinds = config.layer_kinds[: config.scan_period]
    chunk = config.attention_chunk_size
    full = -(-max_len // multiple) * multiple
    return tuple(min(chunk, max_len) if chunk_aware and kind.chunked else full for kind in kinds)


def _cache_shapes(
    config: Llama4Config, batch: int, max_len: int, chunk_aware: bool, multiple: int = 1
) -> dict[str, tuple[int, ...]]:
    groups = config.num_hidden_layers // config.scan_period
    kv, h = config.num_key_value_heads, config.head_dim
    return {
        f"layer_{slot}": (groups, batch, s, kv, h)
        for slot, s in enumerate(cache_lengths(config, max_len, chunk_aware, multiple))
    }


def init_cache(
    config: Llama4Config,
    batch: int,
    max_len: int,
    *,
    chunk_aware: bool = True,
    dtype: Any = None,
    multiple: int = 1,
) -> dict[str, dict[str, Array | QArray]]:
    """Zeros {"layer_{slot}": {"k", "v": [G, B, S, K, H]}} in `dtype` (default: the compute
    dtype; one of KV_CACHE_DTYPES); "int8": `QArray`s of int8 values and one fp32 scale per
    (token, kv head), [G, B, S, K, 1], which the model writes quantized and reads
    dequantized in the compute dtype (`l4jax.model.write_cache`). `multiple`: see
    `cache_lengths`."""
    dtype = check_cache_dtype(dtype) or config.dtype

    def zeros(shape):
        if dtype == "int8":
            return QArray(jnp.zeros(shape, jnp.int8), jnp.zeros((*shape[:-1], 1), jnp.float32))
        return jnp.zeros(shape, dtype)

    return {
        name: {"k": zeros(shape), "v": zeros(shape)}
        for name, shape in _cache_shapes(config, batch, max_len, chunk_aware, multiple).items()
    }


def check_cache_dtype(dtype: Any) -> str | None:
    """`dtype` as a KV_CACHE_DTYPES name (None stays None); anything else a ConfigError."""
    if dtype is None:
        return None
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in KV_CACHE_DTYPES:
        raise ConfigError(f"kv cache dtype {name!r}: choose one of {KV_CACHE_DTYPES}")
    return name


def cache_logical_axes(config: Llama4Config, dtype: Any = None) -> dict[str, dict[str, Any]]:
    """Logical axis names of the cache of `init_cache(..., dtype=dtype)` (as
    `param_logical_axes`): `layers` + `kv_cache_axes` of each scan slot's layer kind; an
    int8 cache's `QArray`s get them for the values and all but head_dim for the scales."""
    kinds = config.layer_kinds[: config.scan_period]
    specs = [PartitionSpec("layers", *kv_cache_axes(kind.chunked)) for kind in kinds]
    if check_cache_dtype(dtype) == "int8":
        specs = [QArray(spec, PartitionSpec(*spec[:-1], None)) for spec in specs]
    return {f"layer_{slot}": {"k": spec, "v": spec} for slot, spec in enumerate(specs)}


def cache_bytes(
    config: Llama4Config,
    max_len: int,
    *,
    batch: int = 1,
    dtype: Any = "bfloat16",
    chunk_aware: bool = True,
) -> int:
    """Bytes of the K and V cache for `batch` rows of `max_len` tokens (arithmetic, no arrays;
    int8 with its fp32 scales)."""
    dtype = check_cache_dtype(dtype)
    shapes = _cache_shapes(config, batch, max_len, chunk_aware).values()
    values = 2 * jnp.dtype(dtype).itemsize * sum(int(np.prod(s)) for s in shapes)
    scales = 2 * 4 * sum(int(np.prod(s[:-1])) for s in shapes) if dtype == "int8" else 0
    return values + scales


def tree_bytes(tree: Any) -> int:
    """Bytes held by the arrays of a pytree (e.g. a cache from `init_cache`)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
