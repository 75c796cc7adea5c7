"""The KV cache of generation: one `{"k", "v"}` pair of [G, B, S, K, H] arrays per scan slot.

G layer groups (as the params), B rows, S slots, K kv heads, H head_dim. NoPE/global layers
keep every index (S = the longest sequence); chunked RoPE layers keep a ring of
S = min(attention_chunk_size, longest) slots, because a query never looks back past the start
of its chunk (`chunk_aware`). `l4jax.decoding` fills and reads it through the model's
`cache=` argument.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from l4jax.config import Llama4Config
from l4jax.model import kv_cache_axes

Array = jax.Array


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
) -> dict[str, dict[str, Array]]:
    """Zeros {"layer_{slot}": {"k", "v": [G, B, S, K, H]}} (dtype: the compute dtype);
    `multiple`: see `cache_lengths`."""
    dtype = jnp.dtype(dtype or config.dtype)
    return {
        name: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
        for name, shape in _cache_shapes(config, batch, max_len, chunk_aware, multiple).items()
    }


def cache_logical_axes(config: Llama4Config) -> dict[str, dict[str, PartitionSpec]]:
    """Logical axis names of the cache (as `param_logical_axes`): `layers` + `kv_cache_axes`
    of each scan slot's layer kind."""
    kinds = config.layer_kinds[: config.scan_period]
    specs = [PartitionSpec("layers", *kv_cache_axes(kind.chunked)) for kind in kinds]
    return {f"layer_{slot}": {"k": spec, "v": spec} for slot, spec in enumerate(specs)}


def cache_bytes(
    config: Llama4Config,
    max_len: int,
    *,
    batch: int = 1,
    dtype: Any = "bfloat16",
    chunk_aware: bool = True,
) -> int:
    """Bytes of the K and V cache for `batch` rows of `max_len` tokens (arithmetic, no arrays)."""
    itemsize = jnp.dtype(dtype).itemsize
    shapes = _cache_shapes(config, batch, max_len, chunk_aware)
    return 2 * itemsize * sum(int(np.prod(s)) for s in shapes.values())


def tree_bytes(tree: Any) -> int:
    """Bytes held by the arrays of a pytree (e.g. a cache from `init_cache`)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
