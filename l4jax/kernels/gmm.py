"""Grouped matmul (MoE expert dispatch) as Pallas TPU kernels.

What is computed (the semantics of ``jax.lax.ragged_dot``): tokens arrive sorted by expert, so
``group_sizes[G]`` splits the rows of ``lhs_mk [M, K]`` into consecutive groups and

    gmm:        out_mn[m]    = lhs_mk[m] @ rhs_gkn[group(m)]                     -> [M, N]
    tgmm:       drhs_gkn[g]  = lhs_mk[rows of g].T @ dout_mn[rows of g]          -> [G, K, N]
    gmm_swiglu: out_mf[m]    = silu(x_mk[m] @ w_gate[group(m)]) * (x_mk[m] @ w_up[group(m)])

Rows past ``sum(group_sizes)`` give zeros (gmm) or are ignored (tgmm); empty groups are allowed.
``gmm`` and ``gmm_swiglu`` carry a ``jax.custom_vjp`` whose backward is again gmm + tgmm.

Tiling and schedule (the megablox scheme). The wrapper pads M, K, N up to the tile sizes
``(tm, tk, tn)`` (default 128, a multiple of the MXU width). A row tile can straddle a group
boundary, so the grid walks over *visits*: one visit = (row tile, group) pair that share at least
one row. ``make_group_schedule`` builds the visit list with plain jnp (V = tiles_m + G entries,
some empty) and it reaches the kernel through scalar prefetch (SMEM), where the BlockSpec index
maps read it to pick the lhs row tile and the expert's weight tile. The gmm grid is
``(N tiles, V visits, K tiles)``: the K loop accumulates into an fp32 VMEM scratch, and on the
last K tile the rows of the tile that belong to the visit's group are written to the output
block; visits of one row tile are consecutive, so the output block stays resident in VMEM until
all the groups that share it are done. The tgmm grid is ``(K tiles, N tiles, V visits)`` and
accumulates the masked ``lhs.T @ dout`` of all visits of one group into its [tk, tn] block.

Roofline (per grid step of gmm; b = bytes per input element). A step multiplies a [tm, tk] lhs
tile by a [tk, tn] weight tile: 2*tm*tk*tn FLOPs for (tm*tk + tk*tn)*b bytes read from HBM (the
[tm, tn] output is written once per K loop and is amortised over it), so the arithmetic
intensity is 2*tm*tn / ((tm + tn)*b) FLOPs/byte, independent of tk. For bf16 and
tm = tk = tn = 128: 4.2 MFLOP per 64 KiB, i.e. 64 FLOPs/byte, below the ridge point of current
TPUs (roughly 240 FLOPs/byte on v5e, 166 on v5p), so 128-tiles are HBM bound. With 512-tiles:
268 MFLOP per 1 MiB, i.e. 256 FLOPs/byte, compute bound, using ~4 MiB of VMEM per step
(double-buffered inputs and output plus the fp32 accumulator). Over the whole call the useful
work is 2*M*K*N FLOPs, but up to 2*(tiles_m + G)*tm*K*N are issued since a straddled tile is
multiplied once per group it touches; HBM traffic is ~M*K*b*tiles_n (lhs, re-read per N tile)
+ V*K*N*b (one weight strip per visit) + M*N*b_out, so small groups (few tokens per expert)
make the weight term dominate.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.typing import DTypeLike

Tiling = tuple[int, int, int]
Residuals = tuple[jax.Array, ...]
Index = jax.Array  # a grid index or block index (int32 scalar) inside a BlockSpec index map
DEFAULT_TILING: Tiling = (128, 128, 128)
_SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


class GroupSchedule(NamedTuple):
    """Visit list of a grouped matmul; every field is [V] int32 with V = tiles_m + G.

    Visit v multiplies row tile ``tile_ids[v]`` by the weights of expert ``group_ids[v]`` and
    owns the global rows ``[row_start[v], row_end[v])`` (empty when they are equal). Both id
    arrays are non-decreasing, so revisits of one output block are consecutive.
    """

    group_ids: jax.Array
    tile_ids: jax.Array
    row_start: jax.Array
    row_end: jax.Array


def make_group_schedule(group_sizes: jax.Array, m: int, tm: int) -> GroupSchedule:
    """Builds the visit list for ``group_sizes [G]`` over ``m`` rows cut into ``tm``-row tiles.

    Every tile start and every group end opens a visit, sorted by row (tile starts first on
    ties, group ends in group order). The visit opened by the end of group g belongs to group
    g + 1, so the group of a visit is the number of group ends up to it; group G stands for the
    rows past ``sum(group_sizes)``, which own nothing and are clamped onto group G - 1. This
    visits every row tile (its output gets written) and every group (tgmm zeroes empty ones).
    """
    tiles_m, num_groups = pl.cdiv(m, tm), group_sizes.shape[0]
    group_ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    tile_starts = jnp.arange(tiles_m, dtype=jnp.int32) * tm
    starts = jnp.concatenate([tile_starts, group_ends])
    is_group_end = jnp.concatenate([jnp.zeros(tiles_m, jnp.int32), jnp.ones(num_groups, jnp.int32)])
    order = jnp.argsort(2 * starts + is_group_end, stable=True)
    row_start = starts[order]
    next_start = jnp.concatenate([row_start[1:], jnp.full((1,), tiles_m * tm, jnp.int32)])
    row_end = jnp.minimum(next_start, group_ends[-1])  # the tail past sum(group_sizes) owns none
    return GroupSchedule(
        group_ids=jnp.minimum(jnp.cumsum(is_group_end[order]), num_groups - 1),
        tile_ids=jnp.minimum(row_start // tm, tiles_m - 1),
        row_start=row_start,
        row_end=jnp.maximum(row_end, row_start),
    )


def active_visits(sched: GroupSchedule, group_sizes: jax.Array, m: int) -> jax.Array:
    """int32 scalar: the visits that start before ``sum(group_sizes)`` (a prefix, as visits are
    sorted by row). The kernels' grids stop there: row tiles past the routed rows (under
    expert parallelism most of the gathered buffer: the other devices' experts' rows) cost no
    grid steps and no DMA; the callers zero what those visits would have written."""
    total = jnp.minimum(jnp.sum(group_sizes.astype(jnp.int32)), m)
    return jnp.maximum(jnp.sum(sched.row_start < total), 1).astype(jnp.int32)


def row_mask(sched: GroupSchedule, v: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """[rows, cols] bool: which rows of visit v's row tile belong to its group."""
    rows = jax.lax.broadcasted_iota(jnp.int32, shape, 0) + sched.tile_ids[v] * shape[0]
    return (rows >= sched.row_start[v]) & (rows < sched.row_end[v])


def _dot_f32(lhs: jax.Array, rhs: jax.Array, transpose_rhs: bool) -> jax.Array:
    """[tm, tk] @ [tk, tn] (or @ [tn, tk].T) with fp32 accumulation on the MXU."""
    dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))
    return jax.lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32)


Epilogue = Callable[..., jax.Array]


def identity(acc: jax.Array) -> jax.Array:
    return acc


def swiglu(acc_gate: jax.Array, acc_up: jax.Array) -> jax.Array:
    return jax.nn.silu(acc_gate) * acc_up


# (lhs tile [tm, tk], one weight operand's refs, k) -> fp32 [tm, tn]
TileDot = Callable[[jax.Array, Sequence[jax.Array], jax.Array], jax.Array]


def grouped_matmul_kernel(
    *refs: jax.Array, num_rhs: int, refs_per_rhs: int, tile_dot: TileDot, epilogue: Epilogue
) -> None:
    """The body of gmm and of the quantized kernels (`kernels.quantized`). Grid (n, v, k).
    refs: 4 schedule refs (SMEM), lhs [tm, tk], num_rhs weight operands of `refs_per_rhs` refs
    each (a tile; or quantized values and scales), out [tm, tn], num_rhs fp32 accumulators
    [tm, tn]; `tile_dot` multiplies the lhs tile by one operand's k-th weight tile."""
    sched = GroupSchedule(*refs[:4])
    lhs_ref, num_w = refs[4], num_rhs * refs_per_rhs
    rhs_refs = [refs[5 + i : 5 + i + refs_per_rhs] for i in range(0, num_w, refs_per_rhs)]
    out_ref, acc_refs = refs[5 + num_w], refs[6 + num_w :]
    v, k = pl.program_id(1), pl.program_id(2)

    @pl.when(k == 0)
    def _zero_acc() -> None:
        for acc_ref in acc_refs:
            acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(sched.row_start[v] < sched.row_end[v])
    def _accumulate() -> None:
        lhs = lhs_ref[...]
        for operand_refs, acc_ref in zip(rhs_refs, acc_refs, strict=True):
            acc_ref[...] += tile_dot(lhs, operand_refs, k)

    @pl.when(k == pl.num_programs(2) - 1)
    def _store() -> None:
        first_visit_of_tile = (v == 0) | (
            sched.tile_ids[v] != sched.tile_ids[jnp.maximum(v - 1, 0)]
        )

        @pl.when(first_visit_of_tile)
        def _zero_out() -> None:  # rows of no group (past sum(group_sizes)) stay zero
            out_ref[...] = jnp.zeros_like(out_ref)

        result = epilogue(*(acc_ref[...] for acc_ref in acc_refs))  # fp32 [tm, tn]
        mask = row_mask(sched, v, out_ref.shape)
        out_ref[...] = jnp.where(mask, result, out_ref[...].astype(jnp.float32)).astype(
            out_ref.dtype
        )


def _dense_tile_dot(
    lhs: jax.Array, rhs_refs: Sequence[jax.Array], k: jax.Array, transpose_rhs: bool
) -> jax.Array:
    del k  # the BlockSpec already selected the k-th tile
    return _dot_f32(lhs, rhs_refs[0][...], transpose_rhs)


def _tgmm_kernel(*refs: jax.Array) -> None:
    """Grid (k, n, v). refs: 4 schedule refs (SMEM), lhs [tm, tk], dout [tm, tn],
    out [tk, tn] of the visit's group, fp32 accumulator [tk, tn]."""
    sched = GroupSchedule(*refs[:4])
    lhs_ref, dout_ref, out_ref, acc_ref = refs[4:]
    v, last = pl.program_id(2), pl.num_programs(2) - 1
    group = sched.group_ids[v]

    @pl.when((v == 0) | (group != sched.group_ids[jnp.maximum(v - 1, 0)]))
    def _zero_acc() -> None:
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(sched.row_start[v] < sched.row_end[v])
    def _accumulate() -> None:
        def masked(ref: jax.Array) -> jax.Array:  # zero rows of other groups, in fp32
            return jnp.where(row_mask(sched, v, ref.shape), ref[...].astype(jnp.float32), 0.0)

        lhs_km = masked(lhs_ref).T.astype(lhs_ref.dtype)
        dout_mn = masked(dout_ref).astype(dout_ref.dtype)
        acc_ref[...] += jnp.dot(lhs_km, dout_mn, preferred_element_type=jnp.float32)

    @pl.when((v == last) | (group != sched.group_ids[jnp.minimum(v + 1, last)]))
    def _store() -> None:
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    """`x` zero-padded at the end of `axis` to a multiple of `multiple`."""
    pad = -x.shape[axis] % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _compute_dtype(*xs: jax.Array) -> jnp.dtype:
    dtype = jnp.result_type(*xs)
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"gmm supports float32 and bfloat16 inputs, got {dtype}")
    return dtype


def interpret_params(interpret: bool) -> pltpu.InterpretParams | bool:
    """TPU interpret mode simulates VMEM/SMEM and fills uninitialised buffers with NaN. It
    also synchronises all devices of a shard_map with a `threading.Barrier`, which hangs on
    XLA:CPU's simulated devices (expert parallelism), so inside a shard_map the plain Pallas
    interpreter runs the kernel instead."""
    if not interpret:
        return False
    if jax.sharding.get_abstract_mesh().manual_axes:
        return True
    return pltpu.InterpretParams()


def _check_groups(m: int, group_sizes: jax.Array, num_groups: int) -> None:
    if group_sizes.shape != (num_groups,) or num_groups == 0:
        raise ValueError(f"group_sizes must be [{num_groups}] (G >= 1), got {group_sizes.shape}")
    if m == 0:
        raise ValueError("gmm needs at least one row")


def _gmm_call(
    lhs_mk: jax.Array,
    rhs_gkn: Sequence[jax.Array],
    group_sizes: jax.Array,
    *,
    tiling: Tiling,
    out_dtype: jnp.dtype,
    interpret: bool,
    epilogue: Epilogue = identity,
    transpose_rhs: bool = False,
) -> jax.Array:
    """epilogue(lhs_mk @ rhs[group] for rhs in rhs_gkn) -> [M, N]; each rhs is [G, K, N]
    ([G, N, K] if transpose_rhs)."""
    tm, tk, tn = tiling
    (m, k), (num_groups, *rhs_kn) = lhs_mk.shape, rhs_gkn[0].shape
    k_axis, n_axis = (2, 1) if transpose_rhs else (1, 2)
    n = rhs_kn[n_axis - 1]
    _check_groups(m, group_sizes, num_groups)
    if rhs_kn[k_axis - 1] != k or any(r.shape != rhs_gkn[0].shape for r in rhs_gkn):
        raise ValueError(f"contracting dims differ: lhs {lhs_mk.shape}, rhs {rhs_gkn[0].shape}")
    dtype = _compute_dtype(lhs_mk, *rhs_gkn)
    lhs = pad_axis(pad_axis(lhs_mk.astype(dtype), 0, tm), 1, tk)
    rhs = [pad_axis(pad_axis(r.astype(dtype), k_axis, tk), n_axis, tn) for r in rhs_gkn]
    sched = make_group_schedule(group_sizes, m, tm)
    tiles_n, tiles_k = rhs[0].shape[n_axis] // tn, lhs.shape[1] // tk
    num_visits = sched.tile_ids.shape[0]  # static bound; the grid runs the active ones

    def lhs_map(n_i: Index, v: Index, k_i: Index, *s: jax.Array) -> tuple[Index, ...]:
        return GroupSchedule(*s).tile_ids[v], k_i

    def rhs_map(n_i: Index, v: Index, k_i: Index, *s: jax.Array) -> tuple[Index, ...]:
        group = GroupSchedule(*s).group_ids[v]
        return (group, n_i, k_i) if transpose_rhs else (group, k_i, n_i)

    def out_map(n_i: Index, v: Index, k_i: Index, *s: jax.Array) -> tuple[Index, ...]:
        return GroupSchedule(*s).tile_ids[v], n_i

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    itemsize = jnp.dtype(dtype).itemsize
    cost = pl.CostEstimate(
        flops=2 * m * k * n * len(rhs),
        transcendentals=m * n if epilogue is swiglu else 0,
        bytes_accessed=itemsize * (lhs.size * tiles_n + len(rhs) * num_visits * k * n)
        + jnp.dtype(out_dtype).itemsize * m * n,
    )
    out = pl.pallas_call(
        functools.partial(
            grouped_matmul_kernel,
            num_rhs=len(rhs),
            refs_per_rhs=1,
            tile_dot=functools.partial(_dense_tile_dot, transpose_rhs=transpose_rhs),
            epilogue=epilogue,
        ),
        out_shape=jax.ShapeDtypeStruct((lhs.shape[0], tiles_n * tn), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(sched),
            grid=(tiles_n, active_visits(sched, group_sizes, m), tiles_k),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map)]
            + [pl.BlockSpec(rhs_block, rhs_map)] * len(rhs),
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)] * len(rhs),
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        cost_estimate=cost,
        interpret=interpret_params(interpret),
    )(*sched, lhs, *rhs)
    return routed_rows(out, m, n, group_sizes, out_dtype)


def routed_rows(
    out: jax.Array, m: int, n: int, group_sizes: jax.Array, out_dtype: jnp.dtype
) -> jax.Array:
    """The padded kernel output cut to [m, n], rows past sum(group_sizes) zero (the grid
    stops at the routed rows: the tiles past them are never written)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (m, 1), 0)
    routed = rows < jnp.sum(group_sizes.astype(jnp.int32))
    return jnp.where(routed, out[:m, :n], 0).astype(out_dtype)


def _tgmm_call(
    lhs_mk: jax.Array,
    dout_mn: jax.Array,
    group_sizes: jax.Array,
    *,
    tiling: Tiling,
    out_dtype: jnp.dtype,
    interpret: bool,
) -> jax.Array:
    """[G, K, N] per-group lhs.T @ dout."""
    tm, tk, tn = tiling
    (m, k), (m_out, n), num_groups = lhs_mk.shape, dout_mn.shape, group_sizes.shape[0]
    _check_groups(m, group_sizes, num_groups)
    if m_out != m:
        raise ValueError(f"row counts differ: lhs {lhs_mk.shape}, dout {dout_mn.shape}")
    dtype = _compute_dtype(lhs_mk, dout_mn)
    lhs = pad_axis(pad_axis(lhs_mk.astype(dtype), 0, tm), 1, tk)
    dout = pad_axis(pad_axis(dout_mn.astype(dtype), 0, tm), 1, tn)
    sched = make_group_schedule(group_sizes, m, tm)
    tiles_k, tiles_n = lhs.shape[1] // tk, dout.shape[1] // tn

    def lhs_map(k_i: Index, n_i: Index, v: Index, *s: jax.Array) -> tuple[Index, ...]:
        return GroupSchedule(*s).tile_ids[v], k_i

    def dout_map(k_i: Index, n_i: Index, v: Index, *s: jax.Array) -> tuple[Index, ...]:
        return GroupSchedule(*s).tile_ids[v], n_i

    def out_map(k_i: Index, n_i: Index, v: Index, *s: jax.Array) -> tuple[Index, ...]:
        return GroupSchedule(*s).group_ids[v], k_i, n_i

    itemsize = jnp.dtype(dtype).itemsize
    cost = pl.CostEstimate(
        flops=2 * m * k * n,
        transcendentals=0,
        bytes_accessed=itemsize * (lhs.size * tiles_n + dout.size * tiles_k)
        + jnp.dtype(out_dtype).itemsize * num_groups * k * n,
    )
    out = pl.pallas_call(
        _tgmm_kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, tiles_k * tk, tiles_n * tn), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(sched),
            grid=(tiles_k, tiles_n, active_visits(sched, group_sizes, m)),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), dout_map)],
            out_specs=pl.BlockSpec((None, tk, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=cost,
        interpret=interpret_params(interpret),
    )(*sched, lhs, dout)
    # empty groups after the last routed row have no active visit: never written
    return jnp.where(group_sizes[:, None, None] > 0, out[:, :k, :n], 0).astype(out_dtype)


# ----------------------------------------------------------------------------- gmm + VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    tiling: Tiling,
    out_dtype: jnp.dtype,
    interpret: bool,
) -> jax.Array:
    return _gmm_call(
        lhs, [rhs], group_sizes, tiling=tiling, out_dtype=out_dtype, interpret=interpret
    )


def _gmm_fwd(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    tiling: Tiling,
    out_dtype: jnp.dtype,
    interpret: bool,
) -> tuple[jax.Array, Residuals]:
    out = _gmm(lhs, rhs, group_sizes, tiling, out_dtype, interpret)
    return out, (lhs, rhs, group_sizes)


def _gmm_bwd(
    tiling: Tiling, out_dtype: jnp.dtype, interpret: bool, residuals: Residuals, dout_mn: jax.Array
) -> tuple[jax.Array, jax.Array, None]:
    lhs_mk, rhs_gkn, group_sizes = residuals
    tm, tk, tn = tiling
    # dlhs [M, K] = dout [M, N] @ rhs[g].T: the transpose is fused into the weight BlockSpec.
    dlhs = _gmm_call(
        dout_mn,
        [rhs_gkn],
        group_sizes,
        tiling=(tm, tn, tk),
        out_dtype=lhs_mk.dtype,
        interpret=interpret,
        transpose_rhs=True,
    )
    drhs = _tgmm_call(
        lhs_mk,
        dout_mn,
        group_sizes,
        tiling=tiling,
        out_dtype=rhs_gkn.dtype,
        interpret=interpret,
    )
    return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def resolve_options(
    interpret: bool | None, preferred_element_type: DTypeLike | None, default: jax.Array
) -> tuple[bool, jnp.dtype]:
    """Static options: interpret off TPU; output dtype defaults to the input's."""
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    out_dtype = default.dtype if preferred_element_type is None else preferred_element_type
    return interpret, jnp.dtype(out_dtype)


@functools.partial(jax.jit, static_argnames=("tiling", "preferred_element_type", "interpret"))
def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    tiling: Tiling = DEFAULT_TILING,
    preferred_element_type: DTypeLike | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Grouped matmul ``lhs [M, K] x rhs [G, K, N] -> [M, N]`` (``jax.lax.ragged_dot``).

    Rows are sorted by group: row m uses ``rhs[g]`` for the group g whose cumulative row range
    holds m; rows past ``sum(group_sizes)`` are zero. Differentiable in lhs and rhs.
    ``interpret=None`` runs the kernel in Pallas TPU interpret mode off TPU.
    """
    interpret, out_dtype = resolve_options(interpret, preferred_element_type, lhs)
    return _gmm(lhs, rhs, group_sizes, tuple(tiling), out_dtype, interpret)


@functools.partial(jax.jit, static_argnames=("tiling", "preferred_element_type", "interpret"))
def tgmm(
    lhs: jax.Array,
    dout: jax.Array,
    group_sizes: jax.Array,
    *,
    tiling: Tiling = DEFAULT_TILING,
    preferred_element_type: DTypeLike | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Per-group weight gradient ``lhs [M, K], dout [M, N] -> [G, K, N]``: for each group g,
    ``lhs[rows of g].T @ dout[rows of g]`` (zeros for empty groups). ``tiling`` is (tm, tk, tn).
    """
    interpret, out_dtype = resolve_options(interpret, preferred_element_type, lhs)
    return _tgmm_call(
        lhs, dout, group_sizes, tiling=tuple(tiling), out_dtype=out_dtype, interpret=interpret
    )


# ------------------------------------------------------------------------ fused SwiGLU + VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _gmm_swiglu(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    group_sizes: jax.Array,
    tiling: Tiling,
    out_dtype: jnp.dtype,
    interpret: bool,
) -> jax.Array:
    return _gmm_call(
        x,
        [w_gate, w_up],
        group_sizes,
        tiling=tiling,
        out_dtype=out_dtype,
        interpret=interpret,
        epilogue=swiglu,
    )


def _gmm_swiglu_fwd(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    group_sizes: jax.Array,
    tiling: Tiling,
    out_dtype: jnp.dtype,
    interpret: bool,
) -> tuple[jax.Array, Residuals]:
    out = _gmm_swiglu(x, w_gate, w_up, group_sizes, tiling, out_dtype, interpret)
    return out, (x, w_gate, w_up, group_sizes)


def _gmm_swiglu_bwd(
    tiling: Tiling, out_dtype: jnp.dtype, interpret: bool, residuals: Residuals, dout_mf: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, None]:
    x_mk, w_gate, w_up, group_sizes = residuals
    tm, tk, tf = tiling
    call = functools.partial(_gmm_call, group_sizes=group_sizes, interpret=interpret)
    # Recompute both projections in fp32 (not kept from the forward pass, to save memory).
    gate = call(x_mk, [w_gate], tiling=tiling, out_dtype=jnp.float32)
    up = call(x_mk, [w_up], tiling=tiling, out_dtype=jnp.float32)
    sig = jax.nn.sigmoid(gate)
    dout = dout_mf.astype(jnp.float32)
    dtype = _compute_dtype(x_mk, w_gate, w_up)
    d_gate = (dout * up * sig * (1.0 + gate * (1.0 - sig))).astype(dtype)
    d_up = (dout * gate * sig).astype(dtype)
    back = functools.partial(call, tiling=(tm, tf, tk), out_dtype=jnp.float32, transpose_rhs=True)
    dx = (back(d_gate, [w_gate]) + back(d_up, [w_up])).astype(x_mk.dtype)
    dw = functools.partial(_tgmm_call, group_sizes=group_sizes, tiling=tiling, interpret=interpret)
    dw_gate = dw(x_mk, d_gate, out_dtype=w_gate.dtype)
    dw_up = dw(x_mk, d_up, out_dtype=w_up.dtype)
    return dx, dw_gate, dw_up, None


_gmm_swiglu.defvjp(_gmm_swiglu_fwd, _gmm_swiglu_bwd)


@functools.partial(jax.jit, static_argnames=("tiling", "preferred_element_type", "interpret"))
def gmm_swiglu(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    group_sizes: jax.Array,
    *,
    tiling: Tiling = DEFAULT_TILING,
    preferred_element_type: DTypeLike | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Fused MoE SwiGLU front half ``silu(x @ w_gate[g]) * (x @ w_up[g]) -> [M, F]``.

    ``x [M, K]``, ``w_gate, w_up [G, K, F]``; one kernel pass with two fp32 accumulators,
    SwiGLU applied in fp32 before the single store. ``tiling`` is (tm, tk, tf).
    """
    interpret, out_dtype = resolve_options(interpret, preferred_element_type, x)
    return _gmm_swiglu(x, w_gate, w_up, group_sizes, tuple(tiling), out_dtype, interpret)
