"""Grouped matmul in plain XLA: a loop over row chunks that each belong to one group.

Same semantics as ``jax.lax.ragged_dot`` and the Pallas ``gmm`` (rows of ``lhs_mk [M, K]``
sorted by group, ``group_sizes [G]`` int32, ``out[m] = lhs[m] @ rhs[group(m)]``, rows past
``sum(group_sizes)`` are zero), for XLA:CPU. XLA:CPU lowers ``ragged_dot`` to a dense matmul of
every row with every group's weights, masked, so its cost grows with G: at M=4096, K=512,
N=1024 it takes ~0.5 s for 8 groups and ~7.6 s for 128, where one dense [M, K] @ [K, N] matmul
takes ~45 ms. Here the work is proportional to the rows that exist.

Schedule. Each group's rows are cut into chunks whose sizes are the ``chunk_sizes`` (descending,
default 128, 64, 32, 16): as many chunks of the largest size as fit, then at most one of each
smaller size in turn, and a last chunk of the smallest size that may stick out past the group's
end (those rows are masked). A group of 300 rows is 128 + 128 + 32 + 16 (the last one holds
12 rows), so at most ``min(chunk_sizes) - 1`` padding rows are computed per group, whatever G.
One ``fori_loop`` walks the chunks that exist (a traced trip count: empty groups and rows past
``sum(group_sizes)`` cost nothing, which matters for expert parallelism, where most rows of the
gathered buffer belong to other devices' experts); each step is a ``lax.switch`` on the chunk
size, a [c, K] @ [K, N] matmul with fp32 accumulation and a masked write back.
The loop is not reverse-differentiable by itself, so ``chunked_gmm`` carries a ``custom_vjp``
whose backward pass is the same loop twice: ``dlhs = chunked_gmm(dout, rhs^T)`` and the
per-group weight gradient ``drhs[g] = lhs[rows of g].T @ dout[rows of g]`` (``chunked_tgmm``).
Like the Pallas kernels, it carries no shard_map varying-axis types: use it under
``shard_map(..., check_vma=False)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from l4jax.quantization import QArray

Array = jax.Array
ChunkSizes = tuple[int, ...]
DEFAULT_CHUNK_SIZES: ChunkSizes = (128, 64, 32, 16)


class LevelSchedule(NamedTuple):
    """The chunks of one size; fields are [max_chunks] int32, valid up to ``num_chunks``."""

    num_chunks: Array  # scalar
    group_ids: Array  # the chunk's group
    row_start: Array  # first row of the chunk
    row_end: Array  # end of the chunk's group (rows at or past it are masked)


def _max_chunks(m: int, num_groups: int, chunk_sizes: ChunkSizes, level: int) -> int:
    """A static bound on the chunks of one size over all groups."""
    size, last = chunk_sizes[level], level == len(chunk_sizes) - 1
    total = m // size + (num_groups if last else 0)  # floor(n/size) sums to <= m // size
    if level == 0:
        return max(total, 1)
    rest = chunk_sizes[level - 1] - 1  # what the bigger sizes leave of a group
    per_group = -(-rest // size) if last else rest // size
    return max(min(total, per_group * num_groups), 1)


def make_chunk_schedule(group_sizes: Array, m: int, chunk_sizes: ChunkSizes) -> list[LevelSchedule]:
    """Cuts every group into chunks of the sizes in ``chunk_sizes`` (see the module docstring);
    one ``LevelSchedule`` per size."""
    n_g = group_sizes.astype(jnp.int32)
    num_groups, num_levels = n_g.shape[0], len(chunk_sizes)
    group_end = jnp.cumsum(n_g)
    offset_g = group_end - n_g  # where the next chunk of each group starts
    levels, rest = [], n_g
    for level, size in enumerate(chunk_sizes):
        last = level == num_levels - 1
        count_g = -(-rest // size) if last else rest // size
        rest = rest % size
        max_chunks = _max_chunks(m, num_groups, chunk_sizes, level)
        ends = jnp.cumsum(count_g)  # [G]
        chunk = jnp.arange(max_chunks, dtype=jnp.int32)
        group = jnp.minimum(jnp.searchsorted(ends, chunk, side="right"), num_groups - 1)
        index_in_group = chunk - (ends[group] - count_g[group])
        start = offset_g[group] + index_in_group * size
        levels.append(LevelSchedule(ends[-1], group, start, group_end[group]))
        offset_g = offset_g + count_g * size
    return levels


def _pad_rows(x: Array, rows: int) -> Array:
    return jnp.pad(x, ((0, rows), (0, 0)))


def _row_mask(start: Array, end: Array, size: int) -> Array:
    return (start + jnp.arange(size, dtype=jnp.int32) < end)[:, None]  # [size, 1]


def _chunk_loop(
    init: Array, group_sizes: Array, m: int, chunk_sizes: ChunkSizes, step: Callable[..., Array]
) -> Array:
    """Runs ``carry = step(size, group, start, end, carry)`` over every chunk, size by size."""
    carry = init
    for size, sched in zip(chunk_sizes, make_chunk_schedule(group_sizes, m, chunk_sizes)):

        def body(i: Array, c: Array, size: int = size, sched: LevelSchedule = sched) -> Array:
            return step(size, sched.group_ids[i], sched.row_start[i], sched.row_end[i], c)

        carry = jax.lax.fori_loop(0, sched.num_chunks, body, carry)
    return carry


def _gmm_loop(
    lhs_mk: Array,
    rhs: Array | QArray,
    group_sizes: Array,
    chunk_sizes: ChunkSizes,
    transpose_rhs: bool,
) -> Array:
    """lhs @ rhs[g] (rhs [G, K, N]) or lhs @ rhs[g].T (rhs [G, N, K]) per chunk -> [M, N].

    A quantized `rhs` (`QArray`) is dequantized one expert at a time, in the chunk's step."""
    m = lhs_mk.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    lhs = _pad_rows(lhs_mk, chunk_sizes[0])
    dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))

    def step(size: int, g: Array, start: Array, end: Array, out: Array) -> Array:
        x = jax.lax.dynamic_slice_in_dim(lhs, start, size)
        w = rhs[g].astype(lhs_mk.dtype)  # a no-op for plain weights of lhs's dtype
        y = jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)
        old = jax.lax.dynamic_slice_in_dim(out, start, size)
        new = jnp.where(_row_mask(start, end, size), y.astype(out.dtype), old)
        return jax.lax.dynamic_update_slice_in_dim(out, new, start, 0)

    out = jnp.zeros((m + chunk_sizes[0], n), lhs_mk.dtype)
    return _chunk_loop(out, group_sizes, m, chunk_sizes, step)[:m]


def chunked_tgmm(
    lhs_mk: Array, dout_mn: Array, group_sizes: Array, chunk_sizes: ChunkSizes = DEFAULT_CHUNK_SIZES
) -> Array:
    """Per-group ``lhs[rows of g].T @ dout[rows of g]`` -> [G, K, N] (zeros for empty groups)."""
    (m, k), n, num_groups = lhs_mk.shape, dout_mn.shape[1], group_sizes.shape[0]
    lhs, dout = _pad_rows(lhs_mk, chunk_sizes[0]), _pad_rows(dout_mn, chunk_sizes[0])

    def step(size: int, g: Array, start: Array, end: Array, acc: Array) -> Array:
        mask = _row_mask(start, end, size)
        x = jnp.where(mask, jax.lax.dynamic_slice_in_dim(lhs, start, size), 0)
        d = jnp.where(mask, jax.lax.dynamic_slice_in_dim(dout, start, size), 0)
        return acc.at[g].add(jnp.einsum("ck,cn->kn", x, d, preferred_element_type=jnp.float32))

    acc = jnp.zeros((num_groups, k, n), jnp.float32)
    return _chunk_loop(acc, group_sizes, m, chunk_sizes, step).astype(lhs_mk.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_gmm(lhs: Array, rhs: Array, group_sizes: Array, chunk_sizes: ChunkSizes) -> Array:
    return _gmm_loop(lhs, rhs, group_sizes, chunk_sizes, transpose_rhs=False)


def _fwd(lhs: Array, rhs: Array, group_sizes: Array, chunk_sizes: ChunkSizes):
    out = _chunked_gmm(lhs, rhs, group_sizes, chunk_sizes)
    return out, (lhs, rhs, group_sizes)


def _bwd(chunk_sizes: ChunkSizes, residuals: tuple[Array, Array, Array], dout: Array):
    lhs, rhs, group_sizes = residuals
    dlhs = _gmm_loop(dout, rhs, group_sizes, chunk_sizes, transpose_rhs=True)
    drhs = chunked_tgmm(lhs, dout, group_sizes, chunk_sizes).astype(rhs.dtype)
    return dlhs.astype(lhs.dtype), drhs, None


_chunked_gmm.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_qgmm(lhs: Array, rhs: QArray, group_sizes: Array, chunk_sizes: ChunkSizes) -> Array:
    return _gmm_loop(lhs, rhs, group_sizes, chunk_sizes, transpose_rhs=False)


def _qfwd(lhs: Array, rhs: QArray, group_sizes: Array, chunk_sizes: ChunkSizes):
    return _chunked_qgmm(lhs, rhs, group_sizes, chunk_sizes), (rhs, group_sizes)


def _qbwd(chunk_sizes: ChunkSizes, residuals: tuple[QArray, Array], dout: Array):
    """Gradient in lhs only (a quantized weight is frozen: QLoRA trains adapters through it),
    dequantizing one expert at a time as the forward does; zero cotangents for the weight."""
    rhs, group_sizes = residuals
    dlhs = _gmm_loop(dout, rhs, group_sizes, chunk_sizes, transpose_rhs=True)
    return dlhs.astype(dout.dtype), jax.tree.map(_zero_cotangent, rhs), None


def _zero_cotangent(x: Array) -> Array:
    if jnp.issubdtype(x.dtype, jnp.integer):
        return np.zeros(x.shape, jax.dtypes.float0)
    return jnp.zeros_like(x)


_chunked_qgmm.defvjp(_qfwd, _qbwd)


def chunked_gmm(
    lhs_mk: Array,
    rhs_gkn: Array | QArray,
    group_sizes: Array,
    chunk_sizes: ChunkSizes = DEFAULT_CHUNK_SIZES,
) -> Array:
    """Grouped matmul ``lhs [M, K] x rhs [G, K, N] -> [M, N]`` (``jax.lax.ragged_dot``
    semantics, output in lhs's dtype, fp32 accumulation); differentiable in lhs and rhs.
    A quantized ``rhs`` (`l4jax.quantization.QArray`) is frozen: differentiable in lhs only."""
    if tuple(sorted(chunk_sizes, reverse=True)) != tuple(chunk_sizes) or min(chunk_sizes) < 1:
        raise ValueError(f"chunk_sizes must be positive and descending, got {chunk_sizes}")
    if rhs_gkn.shape[1] != lhs_mk.shape[1] or group_sizes.shape != (rhs_gkn.shape[0],):
        raise ValueError(
            f"chunked_gmm: lhs {lhs_mk.shape}, rhs {rhs_gkn.shape}, "
            f"group_sizes {group_sizes.shape} do not fit [M, K] x [G, K, N] with [G] sizes"
        )
    if isinstance(rhs_gkn, QArray):
        return _chunked_qgmm(lhs_mk, rhs_gkn, group_sizes, tuple(chunk_sizes))
    return _chunked_gmm(lhs_mk, rhs_gkn, group_sizes, tuple(chunk_sizes))
