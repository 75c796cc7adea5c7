"""Grouped matmuls with a quantized right-hand operand (`l4jax.quantization.QArray`).

Same semantics as ``jax.lax.ragged_dot`` and ``kernels.gmm`` (rows of ``lhs [M, K]`` sorted by
group, ``rhs [G, K, N]``, rows past ``sum(group_sizes)`` zero), for inference (no VJP):

- ``quantized_ragged_dot``: per-channel formats (int8, fp8) pass the stored values to
  ``ragged_dot`` as they are (mixed-dtype operand, fp32 accumulation) and scale each output row
  by its group's channel scales, which factor out of the K sum; int4, whose group scales do
  not, is dequantized for the one layer being computed first.
- ``qgmm`` / ``qgmm_swiglu``: the Pallas kernels of ``kernels.gmm`` (same visit schedule, grid
  (N tiles, visits, K tiles), fp32 VMEM accumulators) with each weight tile dequantized in VMEM
  before its MXU dot: ``q [tk, tn] * scale`` (int8/fp8, one scale row per group) or the packed
  int4 tile ``[tk/2, tn]`` unpacked and multiplied by its ``[tk/128, tn]`` group scales. HBM
  reads of the weight strip drop from 2 bytes per value (bf16) to 1 (int8/fp8) or ~0.53 (int4
  with fp32 group scales), which is the whole gain when the weight term dominates (decode).
  The scales of one expert's column strip are read whole (``[K/g, tn]``, a full-extent block)
  and the k-th tile's rows sliced in the kernel. Tested in Pallas TPU interpret mode on CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.typing import DTypeLike

from l4jax.kernels.gmm import (
    GroupSchedule,
    active_visits,
    grouped_matmul_kernel,
    identity,
    interpret_params,
    make_group_schedule,
    pad_axis,
    resolve_options,
    routed_rows,
    swiglu,
)
from l4jax.quantization import QArray, unpack_int4

Array = jax.Array
Tiling = tuple[int, int, int]


def group_ids(group_sizes: Array, m: int) -> Array:
    """[M] int32: the group of each sorted row (rows past the last group get G - 1)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    rows = jnp.arange(m, dtype=jnp.int32)
    return jnp.minimum(jnp.searchsorted(ends, rows, side="right"), group_sizes.shape[0] - 1)


def quantized_ragged_dot(lhs: Array, rhs: QArray, group_sizes: Array) -> Array:
    """``ragged_dot(lhs, dequantize(rhs))`` -> [M, N] in lhs's dtype."""
    if rhs.mode == "int4":  # group scales vary along K: dequantize this layer's experts
        w = rhs.astype(lhs.dtype)
        return jax.lax.ragged_dot(lhs, w, group_sizes, preferred_element_type=lhs.dtype)
    out = jax.lax.ragged_dot(lhs, rhs.qvalue, group_sizes, preferred_element_type=jnp.float32)
    scale_mn = rhs.scale[:, 0, :][group_ids(group_sizes, lhs.shape[0])]  # [M, N] fp32
    return (out * scale_mn).astype(lhs.dtype)


# ---- Pallas ------------------------------------------------------------------------------------


def _dequant_tile(q: Array, scale: Array, group: int | None, dtype: jnp.dtype) -> Array:
    """A weight tile in `dtype`: q [tk, tn] * scale [1, tn], or packed int4 [tk/2, tn] with
    group scales [tk/group, tn]."""
    if group is None:
        return (q.astype(jnp.float32) * scale).astype(dtype)
    tk, tn = 2 * q.shape[0], q.shape[1]
    w = unpack_int4(q, group).astype(jnp.float32).reshape(tk // group, group, tn)
    return (w * scale[:, None, :]).reshape(tk, tn).astype(dtype)


def _quantized_tile_dot(
    lhs: Array, rhs_refs: Sequence[Array], k: Array, *, group: int | None, tk: int
) -> Array:
    """lhs [tm, tk] @ the dequantized k-th weight tile: refs (qvalue tile, scale strip)."""
    q_ref, scale_ref = rhs_refs
    if group is None:
        scale = scale_ref[...]
    else:
        rows = tk // group
        scale = scale_ref[pl.ds(k * rows, rows), :]
    w = _dequant_tile(q_ref[...], scale, group, lhs.dtype)
    return jnp.dot(lhs, w, preferred_element_type=jnp.float32)


def _qgmm_call(
    lhs_mk: Array,
    rhs: list[QArray],
    group_sizes: Array,
    tiling: Tiling,
    out_dtype: jnp.dtype,
    interpret: bool,
    fused: bool,
) -> Array:
    """fused: silu(lhs @ rhs[0]) * (lhs @ rhs[1]); else lhs @ rhs[0]."""
    tm, tk, tn = tiling
    (m, k), (num_groups, k_w, n) = lhs_mk.shape, rhs[0].shape
    if k_w != k or any(r.shape != rhs[0].shape or r.mode != rhs[0].mode for r in rhs):
        raise ValueError(f"qgmm: lhs {lhs_mk.shape} does not fit rhs {rhs[0].shape}")
    if group_sizes.shape != (num_groups,):
        raise ValueError(f"qgmm: group_sizes must be [{num_groups}], got {group_sizes.shape}")
    int4 = rhs[0].mode == "int4"
    group = k // rhs[0].scale.shape[1] if int4 else None
    if int4 and tk % group:
        raise ValueError(f"qgmm: K tile {tk} is not a multiple of the int4 group {group}")
    lhs = pad_axis(pad_axis(lhs_mk, 0, tm), 1, tk)
    k_pad = lhs.shape[1]
    operands = []
    for r in rhs:  # padded K rows are zeros (q = 0): they add nothing
        q = pad_axis(pad_axis(r.qvalue, 1, tk // 2 if int4 else tk), 2, tn)
        scale = pad_axis(r.scale, 2, tn)
        if int4:
            scale = pad_axis(scale, 1, k_pad // group)
        operands += [q, scale.astype(jnp.float32)]
    sched = make_group_schedule(group_sizes, m, tm)
    tiles_n, tiles_k = operands[0].shape[2] // tn, k_pad // tk

    def lhs_map(n_i, v, k_i, *s):
        return GroupSchedule(*s).tile_ids[v], k_i

    def q_map(n_i, v, k_i, *s):
        return GroupSchedule(*s).group_ids[v], k_i, n_i

    def scale_map(n_i, v, k_i, *s):  # the whole K strip of this group's scales
        return GroupSchedule(*s).group_ids[v], 0, n_i

    def out_map(n_i, v, k_i, *s):
        return GroupSchedule(*s).tile_ids[v], n_i

    q_block = (None, tk // 2 if int4 else tk, tn)
    scale_block = (None, operands[1].shape[1], tn)
    specs = [pl.BlockSpec((tm, tk), lhs_map)]
    specs += [pl.BlockSpec(q_block, q_map), pl.BlockSpec(scale_block, scale_map)] * len(rhs)
    out = pl.pallas_call(
        functools.partial(
            grouped_matmul_kernel,
            num_rhs=len(rhs),
            refs_per_rhs=2,
            tile_dot=functools.partial(_quantized_tile_dot, group=group, tk=tk),
            epilogue=swiglu if fused else identity,
        ),
        out_shape=jax.ShapeDtypeStruct((lhs.shape[0], tiles_n * tn), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(sched),
            grid=(tiles_n, active_visits(sched, group_sizes, m), tiles_k),
            in_specs=specs,
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)] * len(rhs),
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        interpret=interpret_params(interpret),
    )(*sched, lhs, *operands)
    return routed_rows(out, m, n, group_sizes, out_dtype)


@functools.partial(jax.jit, static_argnames=("tiling", "preferred_element_type", "interpret"))
def qgmm(
    lhs: Array,
    rhs: QArray,
    group_sizes: Array,
    *,
    tiling: Tiling = (128, 128, 128),
    preferred_element_type: DTypeLike | None = None,
    interpret: bool | None = None,
) -> Array:
    """``lhs [M, K] x dequantize(rhs) [G, K, N] -> [M, N]``, tiles dequantized in VMEM."""
    interpret, out_dtype = resolve_options(interpret, preferred_element_type, lhs)
    return _qgmm_call(lhs, [rhs], group_sizes, tuple(tiling), out_dtype, interpret, False)


@functools.partial(jax.jit, static_argnames=("tiling", "preferred_element_type", "interpret"))
def qgmm_swiglu(
    x: Array,
    w_gate: QArray,
    w_up: QArray,
    group_sizes: Array,
    *,
    tiling: Tiling = (128, 128, 128),
    preferred_element_type: DTypeLike | None = None,
    interpret: bool | None = None,
) -> Array:
    """``silu(x @ w_gate[g]) * (x @ w_up[g])`` with quantized gate and up, one pass."""
    interpret, out_dtype = resolve_options(interpret, preferred_element_type, x)
    return _qgmm_call(x, [w_gate, w_up], group_sizes, tuple(tiling), out_dtype, interpret, True)
