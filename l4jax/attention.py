"""Attention backends behind one interface (`config.attention_impl`), like the MoE backends.

    out_btnh, lse_btn = attention(impl, q_btnh, k_bskh, v_bskh, mask)

`mask` is a `MaskSpec`: query/key positions and segment ids plus the chunk size. A key is
visible to a query iff it has the same segment id, a position <= the query's, and (chunked
layers) the same position // chunk. Positions, not indices, drive the mask, so packed segments
and left-padded rows work in every backend that takes positions. Key segment ids < 0 mark keys
no query may see (unwritten cache slots, padding added here).

Backends:
- `xla`: einsum scores [B, K, G, T, S] in fp32 and a [B, T, S] mask; the oracle.
- `blockwise`: online-softmax attention in plain JAX over query blocks x key blocks with an fp32
  running max and sum; it never holds a [T, S] array, and its custom VJP recomputes blocks, so
  the backward pass is memory-linear too. Key blocks the mask empties are skipped, not computed
  and masked (a chunked layer costs O(T x chunk), a causal one O(T^2 / 2)); blocks it leaves
  whole are computed without a mask.
- `splash`: JAX's TPU kernel (`jax.experimental.pallas.ops.tpu.splash_attention`): a
  ChunkedCausalMask on chunked layers, a CausalMask on the others, segment ids for packing.
  Its masks are static and index-based, so it is exact only when every row's positions are its
  indices (no left padding, packed documents restarting at 0 only at chunk multiples); `auto`
  therefore uses it only where that cannot matter (global layers: causal-by-index equals
  causal-by-position inside a segment whose positions step by one).
- `auto`: `splash` on TPU for global layers; else `blockwise` when T * S exceeds
  `BLOCKWISE_MIN_SCORES`, `xla` below.

Every backend but `splash` also returns the fp32 logsumexp of each query's scores, so partial
results over disjoint key sets merge exactly (`merge_partials`): the KV-cache prefill of one
piece against the cache and itself, and context-parallel ring attention, use it. Splash
returns it when asked (`splash_attention(need_lse=True)`, its saved residual): the ring's
steps on TPU.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from l4jax.config import ATTENTION_IMPLS

Array = jax.Array

# auto: blockwise above this many scores per (row, head); below it the einsum path is faster
BLOCKWISE_MIN_SCORES = 2048 * 2048
# per block: (G x 128 queries) x 512 keys per kv head; measured on XLA:CPU at 16k tokens
# (8 heads / 2 kv heads of 64), 128 x 512 ran in 0.67x the time of 512 x 512, 256 x 256 0.9x
BLOCK_Q = 128
BLOCK_K = 512
SPLASH_BLOCK = 128  # splash needs sequence blocks that are multiples of the TPU lane width
_BIG = np.iinfo(np.int32).max // 2
_EMPTY, _FULL, _PARTIAL = 0, 1, 2  # what the mask leaves of a (query block, key block) pair


class MaskSpec(NamedTuple):
    q_positions_bt: Array  # int32 absolute positions
    k_positions_bs: Array
    q_segments_bt: Array  # int32; equal ids attend, key ids < 0 are never visible
    k_segments_bs: Array
    chunk_size: int | None  # static: chunked layers only see their own chunk


def self_mask(positions_bt: Array, segments_bt: Array, chunk_size: int | None) -> MaskSpec:
    return MaskSpec(positions_bt, positions_bt, segments_bt, segments_bt, chunk_size)


def mask_array(
    q_positions_bt: Array,
    k_positions_bs: Array,
    q_segments_bt: Array,
    k_segments_bs: Array,
    chunk_size: int | None,
) -> Array:
    """[B, T, S] bool: causal by position, within one segment, and within one chunk if chunked.

    Positions are absolute and increase along each packed segment, so "causal by position within
    a segment" is plain causal attention for unpacked input and packing-safe otherwise.
    """
    qp, kp = q_positions_bt[:, :, None], k_positions_bs[:, None, :]
    ks = k_segments_bs[:, None, :]
    mask = (kp <= qp) & (q_segments_bt[:, :, None] == ks) & (ks >= 0)
    if chunk_size is not None:
        mask &= (kp // chunk_size) == (qp // chunk_size)
    return mask


def resolve_impl(impl: str, t: int, s: int, chunked: bool, need_lse: bool = False) -> str:
    """The backend `impl` runs as for T queries over S keys (see the module docstring). Splash
    only runs self-attention (T == S) without a logsumexp; elsewhere `splash` means `auto`."""
    if impl == "splash" and t == s and not need_lse:
        return impl
    if impl not in ("auto", "splash"):
        return impl
    tpu = jax.default_backend() == "tpu"
    if impl == "auto" and tpu and not (chunked or need_lse) and t == s and t % SPLASH_BLOCK == 0:
        return "splash"
    return "blockwise" if t * s > BLOCKWISE_MIN_SCORES else "xla"


def attention(
    impl: str,
    q_btnh: Array,
    k_bskh: Array,
    v_bskh: Array,
    mask: MaskSpec,
    need_lse: bool = False,
) -> tuple[Array, Array | None]:
    """GQA attention (kv head j serves query heads j*G .. j*G+G-1) -> (out [B, T, N, H] in q's
    dtype, fp32 logsumexp [B, T, N], or None from splash unless `need_lse`). A query that sees
    no key gets 0 out and logsumexp -inf (`xla` gives the mean of v; such rows are padding)."""
    t, s = q_btnh.shape[1], k_bskh.shape[1]
    impl = resolve_impl(impl, t, s, mask.chunk_size is not None, need_lse)
    with jax.named_scope(f"attention_{impl}"):
        if impl == "xla":
            return xla_attention(q_btnh, k_bskh, v_bskh, mask)
        if impl == "blockwise":
            return blockwise_attention(q_btnh, k_bskh, v_bskh, mask)
        if impl == "splash":
            return splash_attention(q_btnh, k_bskh, v_bskh, mask)
    raise ValueError(f"unknown attention_impl {impl!r}; choose one of {ATTENTION_IMPLS}")


def merge_partials(parts: list[tuple[Array, Array]]) -> tuple[Array, Array]:
    """Combine attention over disjoint key sets: [(out [B, T, N, H], lse [B, T, N])] -> one."""
    lse = functools.reduce(jnp.logaddexp, [p[1] for p in parts])
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    out = sum(o.astype(jnp.float32) * jnp.exp(part_lse - safe)[..., None] for o, part_lse in parts)
    return out.astype(parts[0][0].dtype), lse


# ---- xla: the einsum oracle ------------------------------------------------------------------


def xla_attention(
    q_btnh: Array, k_bskh: Array, v_bskh: Array, mask: MaskSpec
) -> tuple[Array, Array]:
    return _einsum_attention(q_btnh, k_bskh, v_bskh, mask_array(*mask))


def dot_product_attention(q_btnh: Array, k_bskh: Array, v_bskh: Array, mask_bts: Array) -> Array:
    """Einsum GQA attention under an explicit [B, T, S] bool mask (e.g. the vision encoder's)."""
    return _einsum_attention(q_btnh, k_bskh, v_bskh, mask_bts)[0]


def _einsum_attention(q_btnh, k_bskh, v_bskh, visible_bts):
    b, t, n, h = q_btnh.shape
    kv_heads = k_bskh.shape[2]
    q = q_btnh.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k_bskh, preferred_element_type=jnp.float32)
    scores = scores * (h**-0.5)
    visible = visible_bts[:, None, None]
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh)
    lse_bkgt = jax.nn.logsumexp(jnp.where(visible, scores, -jnp.inf), axis=-1)
    return out.reshape(b, t, n, h), lse_bkgt.transpose(0, 3, 1, 2).reshape(b, t, n)


# ---- blockwise: online softmax over visible key blocks ---------------------------------------
# Written here rather than taken from a library: jax.nn.dot_product_attention's XLA path holds
# the full logits, and the Pallas kernels (splash, flash) are TPU/GPU only and index-masked.


class _Blocks(NamedTuple):
    """Padded, blocked inputs: q [nq, B, bq, K, G, H], k/v [B, nk*bk, K, H], mask pieces."""

    q_positions: Array  # [nq, B, bq]
    q_segments: Array
    k_positions: Array  # [B, nk*bk]
    k_segments: Array
    lo: Array  # [nq] first key block a query block may see
    whole: Array  # [nq] blocks lo .. whole - 1 are all _FULL (whole <= hi)
    hi: Array  # [nq] one past the last
    kind: Array  # [nq, nk] int32: _EMPTY (skipped), _FULL (no mask needed) or _PARTIAL


def _pad_to(x: Array, length: int, axis: int, value) -> Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _block_plan(mask: MaskSpec, bq: int, bk: int, nq: int, nk: int) -> _Blocks:
    """Pad and block the mask inputs; from per-block position and segment ranges (over the
    whole batch) decide which key blocks each query block must visit."""
    qp = _pad_to(mask.q_positions_bt.astype(jnp.int32), nq * bq, 1, 0)
    qs = _pad_to(mask.q_segments_bt.astype(jnp.int32), nq * bq, 1, -2)  # padded queries
    kp = _pad_to(mask.k_positions_bs.astype(jnp.int32), nk * bk, 1, 0)
    ks = _pad_to(mask.k_segments_bs.astype(jnp.int32), nk * bk, 1, -1)  # padded keys
    b = qp.shape[0]
    qp_blk = qp.reshape(b, nq, bq).transpose(1, 0, 2)
    qs_blk = qs.reshape(b, nq, bq).transpose(1, 0, 2)
    q_ok = qs_blk >= 0

    def q_range(x):
        lo = jnp.min(jnp.where(q_ok, x, _BIG), axis=(1, 2))
        return lo, jnp.max(jnp.where(q_ok, x, -_BIG), axis=(1, 2))

    k_ok = (ks >= 0).reshape(b, nk, bk)

    def k_range(x):
        x = x.reshape(b, nk, bk)
        return jnp.min(jnp.where(k_ok, x, _BIG), axis=(0, 2)), jnp.max(
            jnp.where(k_ok, x, -_BIG), axis=(0, 2)
        )

    qp_lo, qp_hi = q_range(qp_blk)
    qs_lo, qs_hi = q_range(qs_blk)
    kp_lo, kp_hi = k_range(kp)
    ks_lo, ks_hi = k_range(ks)
    vis = (kp_lo[None, :] <= qp_hi[:, None]) & (ks_lo[None, :] <= qs_hi[:, None])
    vis &= ks_hi[None, :] >= qs_lo[:, None]
    if mask.chunk_size is not None:
        chunk_start = (qp_lo // mask.chunk_size) * mask.chunk_size
        vis &= kp_hi[None, :] >= chunk_start[:, None]
    any_vis = jnp.any(vis, axis=1)
    lo = jnp.where(any_vis, jnp.argmax(vis, axis=1), 0).astype(jnp.int32)
    hi = jnp.where(any_vis, nk - jnp.argmax(vis[:, ::-1], axis=1), 0).astype(jnp.int32)
    # every entry of the block pair visible (all rows one segment, keys before queries, one
    # chunk): its scores need no mask
    one_segment = (qs_lo == qs_hi)[:, None] & (ks_lo == ks_hi)[None, :] & (qs_lo[:, None] == ks_lo)
    full = vis & one_segment & (kp_hi[None, :] <= qp_lo[:, None])
    full &= jnp.all(q_ok, axis=(1, 2))[:, None] & jnp.all(k_ok, axis=(0, 2))[None, :]
    if mask.chunk_size is not None:
        full &= (kp_lo[None, :] // mask.chunk_size) == (qp_hi[:, None] // mask.chunk_size)
    kind = jnp.where(full, _FULL, jnp.where(vis, _PARTIAL, _EMPTY)).astype(jnp.int32)
    # the run of whole blocks from lo: they need neither a mask nor a `switch`
    stop = (~full) & (jnp.arange(nk)[None, :] >= lo[:, None])
    whole = jnp.minimum(jnp.where(jnp.any(stop, axis=1), jnp.argmax(stop, axis=1), nk), hi)
    return _Blocks(qp_blk, qs_blk, kp, ks, lo, whole.astype(jnp.int32), hi, kind)


def _to_query_blocks(x: Array, bq: int, nq: int, kv: int) -> Array:
    """[B, T, N, ...] -> [nq, B, K, G*bq, ...]: query blocks, the G query heads of each kv
    head stacked (T padded to nq * bq)."""
    b, _, n, *rest = x.shape
    g = n // kv
    x = _pad_to(x, nq * bq, 1, 0).reshape(b, nq, bq, kv, g, *rest)
    x = x.transpose(1, 0, 3, 4, 2, *range(5, 5 + len(rest)))
    return x.reshape(nq, b, kv, g * bq, *rest)


def _from_query_blocks(x: Array, t: int, n: int) -> Array:
    """The inverse of `_to_query_blocks`: -> [B, T, N, ...]."""
    nq, b, kv, gbq, *rest = x.shape
    g = n // kv
    x = x.reshape(nq, b, kv, g, gbq // g, *rest).transpose(1, 0, 4, 2, 3, *range(5, 5 + len(rest)))
    return x.reshape(b, nq * (gbq // g), n, *rest)[:, :t]


def _sizes(t: int, s: int, block_q: int, block_k: int) -> tuple[int, int, int, int]:
    bq, bk = min(block_q, t), min(block_k, s)
    return bq, bk, -(-t // bq), -(-s // bk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blockwise(q_btnh, k_bskh, v_bskh, mask_arrays, chunk_size, block_q, block_k):
    return _blockwise_fwd(q_btnh, k_bskh, v_bskh, mask_arrays, chunk_size, block_q, block_k)[0]


def _blockwise_fwd(q_btnh, k_bskh, v_bskh, mask_arrays, chunk_size, block_q, block_k):
    b, t, n, h = q_btnh.shape
    s, kv = k_bskh.shape[1], k_bskh.shape[2]
    g = n // kv
    bq, bk, nq, nk = _sizes(t, s, block_q, block_k)
    plan = _block_plan(MaskSpec(*mask_arrays, chunk_size), bq, bk, nq, nk)
    # laid out once so each block is two plain batched matmuls over (row, kv head) with the G
    # query heads of a kv head stacked: q [nq, B, K, G*bq, H], k/v [B, K, S, H]
    q_blk = _to_query_blocks(q_btnh, bq, nq, kv)
    k = _pad_to(k_bskh, nk * bk, 1, 0).transpose(0, 2, 1, 3)
    v = _pad_to(v_bskh, nk * bk, 1, 0).transpose(0, 2, 1, 3)
    scale = h**-0.5

    def one_query_block(args):
        q, qp, qs, lo, whole, hi, kind = args

        def update(j, carry, visible=None):
            m, run_sum, acc = carry
            kb = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, 2)
            vb = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, 2)
            scores = jnp.einsum("bkqh,bksh->bkqs", q, kb, preferred_element_type=jnp.float32)
            scores = scores * scale
            if visible is not None:
                scores = scores.reshape(b, kv, g, bq, bk)
                scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
                scores = scores.reshape(b, kv, g * bq, bk)
            m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
            m_safe = m_new  # a whole block's scores are finite, so is their max
            if visible is not None:  # a masked row may have none: no (-inf) - (-inf)
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(scores - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum(
                "bkqs,bksh->bkqh", p.astype(v.dtype), vb, preferred_element_type=jnp.float32
            )
            return m_new, alpha * run_sum + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

        def partial(j, carry):
            kp = jax.lax.dynamic_slice_in_dim(plan.k_positions, j * bk, bk, 1)
            ks = jax.lax.dynamic_slice_in_dim(plan.k_segments, j * bk, bk, 1)
            return update(j, carry, mask_array(qp, kp, qs, ks, chunk_size))

        def any_block(j, carry):
            branches = (lambda j, c: c, update, partial)  # _EMPTY, _FULL, _PARTIAL
            return jax.lax.switch(kind[j], branches, j, carry)

        # fp32 running max m, sum l and output accumulator, per (row, kv head, group x query)
        m0 = jnp.full((b, kv, g * bq), -jnp.inf, jnp.float32)
        carry = (m0, jnp.zeros_like(m0), jnp.zeros((b, kv, g * bq, h), jnp.float32))
        carry = jax.lax.fori_loop(lo, whole, update, carry)  # whole blocks: no mask, no switch
        m, run_sum, acc = jax.lax.fori_loop(whole, hi, any_block, carry)
        seen = run_sum > 0
        out = acc / jnp.where(seen, run_sum, 1.0)[..., None]
        m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
        lse = jnp.where(seen, m_safe + jnp.log(jnp.where(seen, run_sum, 1.0)), -jnp.inf)
        return out, lse

    xs = (q_blk, plan.q_positions, plan.q_segments, plan.lo, plan.whole, plan.hi, plan.kind)
    out_blk, lse_blk = jax.lax.map(one_query_block, xs)  # [nq, B, K, G*bq, (H)]
    out = _from_query_blocks(out_blk, t, n).astype(q_btnh.dtype)
    lse = _from_query_blocks(lse_blk, t, n)
    return (out, lse), (q_btnh, k_bskh, v_bskh, mask_arrays, out, lse)


def _blockwise_bwd(chunk_size, block_q, block_k, residuals, cotangents):
    q_btnh, k_bskh, v_bskh, mask_arrays, out, lse = residuals
    dq, dk, dv = _flash_backward(
        q_btnh, k_bskh, v_bskh, mask_arrays, chunk_size, out, lse, *cotangents, block_q, block_k
    )
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), mask_arrays)
    return dq.astype(q_btnh.dtype), dk.astype(k_bskh.dtype), dv.astype(v_bskh.dtype), zeros


def _flash_backward(
    q_btnh, k_bskh, v_bskh, mask_arrays, chunk_size, out, lse, dout, dlse, block_q, block_k
):
    """fp32 (dq, dk, dv): recompute each visible block's probabilities from the logsumexp
    (flash-attention backward): dS = P * (dO V^T - rowsum(dO * O) + dlse). Laid out and
    skipped like the forward (no mask on whole blocks); each block's dK/dV slice is added to
    the running dK/dV outside the `switch`, so the [S]-long accumulators never pass through a
    branch (`benchmarks/long_context.py --attention` times it against the einsum path)."""
    b, t, n, h = q_btnh.shape
    s, kv = k_bskh.shape[1], k_bskh.shape[2]
    g = n // kv
    bq, bk, nq, nk = _sizes(t, s, block_q, block_k)
    plan = _block_plan(MaskSpec(*mask_arrays, chunk_size), bq, bk, nq, nk)
    dout32 = dout.astype(jnp.float32)
    delta = jnp.sum(dout32 * out.astype(jnp.float32), axis=-1)  # [B, T, N]
    if dlse is not None:  # dS = P * (dP - (delta - dlse))
        delta = delta - dlse.astype(jnp.float32)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    k = _pad_to(k_bskh, nk * bk, 1, 0).transpose(0, 2, 1, 3)  # [B, K, S, H]
    v = _pad_to(v_bskh, nk * bk, 1, 0).transpose(0, 2, 1, 3)
    scale = h**-0.5

    def one_query_block(carry, args):
        q, do, lse_q, delta_q, qp, qs, lo, whole, hi, kind = args

        def grads(j, visible=None):
            kb = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, 2)
            vb = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, 2)
            scores = jnp.einsum("bkqh,bksh->bkqs", q, kb, preferred_element_type=jnp.float32)
            p = jnp.exp(scores * scale - lse_q[..., None])
            if visible is not None:
                p = jnp.where(visible[:, None, None], p.reshape(b, kv, g, bq, bk), 0.0)
                p = p.reshape(b, kv, g * bq, bk)
            dp = jnp.einsum("bkqh,bksh->bkqs", do, vb, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_q[..., None]) * scale
            dq_j = jnp.einsum("bkqs,bksh->bkqh", ds, kb, preferred_element_type=jnp.float32)
            dk_j = jnp.einsum("bkqs,bkqh->bksh", ds, q, preferred_element_type=jnp.float32)
            dv_j = jnp.einsum("bkqs,bkqh->bksh", p, do, preferred_element_type=jnp.float32)
            return dq_j, dk_j, dv_j

        def partial(j):
            kp = jax.lax.dynamic_slice_in_dim(plan.k_positions, j * bk, bk, 1)
            ks = jax.lax.dynamic_slice_in_dim(plan.k_segments, j * bk, bk, 1)
            return grads(j, mask_array(qp, kp, qs, ks, chunk_size))

        def empty(j):
            return (
                jnp.zeros(q.shape, jnp.float32),
                jnp.zeros((b, kv, bk, h), jnp.float32),
                jnp.zeros((b, kv, bk, h), jnp.float32),
            )

        def add_slice(acc, x, j):
            part = jax.lax.dynamic_slice_in_dim(acc, j * bk, bk, 2)
            return jax.lax.dynamic_update_slice_in_dim(acc, part + x, j * bk, 2)

        def add(j, inner, grads_j):
            (dq, dk, dv), (dq_j, dk_j, dv_j) = inner, grads_j
            return dq + dq_j, add_slice(dk, dk_j, j), add_slice(dv, dv_j, j)

        def whole_block(j, inner):
            return add(j, inner, grads(j))

        def any_block(j, inner):
            return add(j, inner, jax.lax.switch(kind[j], (empty, grads, partial), j))

        inner = (jnp.zeros(q.shape, jnp.float32), *carry)
        inner = jax.lax.fori_loop(lo, whole, whole_block, inner)
        dq, dk, dv = jax.lax.fori_loop(whole, hi, any_block, inner)
        return (dk, dv), dq

    dkv0 = jnp.zeros((b, kv, nk * bk, h), jnp.float32)
    xs = (
        _to_query_blocks(q_btnh, bq, nq, kv),
        _to_query_blocks(dout32, bq, nq, kv),
        _to_query_blocks(lse_safe, bq, nq, kv),
        _to_query_blocks(delta, bq, nq, kv),
        plan.q_positions,
        plan.q_segments,
        plan.lo,
        plan.whole,
        plan.hi,
        plan.kind,
    )
    (dk, dv), dq_blk = jax.lax.scan(one_query_block, (dkv0, dkv0), xs)
    dq = _from_query_blocks(dq_blk, t, n)
    return dq, dk.transpose(0, 2, 1, 3)[:, :s], dv.transpose(0, 2, 1, 3)[:, :s]


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def attention_grads(
    q_btnh: Array,
    k_bskh: Array,
    v_bskh: Array,
    mask: MaskSpec,
    out_btnh: Array,
    lse_btn: Array,
    dout_btnh: Array,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> tuple[Array, Array, Array]:
    """fp32 (dq, dk, dv) of the part of an attention output that came from the keys in `mask`,
    given the final output and logsumexp, which may cover more keys than these (the flash
    backward, block by block, memory O(T + S)). Summed over disjoint key sets it is the
    gradient of their merged output: ring attention's backward takes the K/V blocks in turn."""
    arrays = tuple(x.astype(jnp.int32) for x in mask[:4])
    return _flash_backward(
        q_btnh, k_bskh, v_bskh, arrays, mask.chunk_size, out_btnh, lse_btn, dout_btnh, None,
        block_q, block_k,
    )  # fmt: skip


def blockwise_attention(
    q_btnh: Array,
    k_bskh: Array,
    v_bskh: Array,
    mask: MaskSpec,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> tuple[Array, Array]:
    """(out [B, T, N, H], fp32 logsumexp [B, T, N]); memory O(T + S) in both passes."""
    arrays = tuple(x.astype(jnp.int32) for x in mask[:4])
    return _blockwise(q_btnh, k_bskh, v_bskh, arrays, mask.chunk_size, block_q, block_k)


def visited_blocks(mask: MaskSpec, block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> int:
    """How many (query block, key block) pairs `blockwise_attention` computes for `mask`."""
    t, s = mask.q_positions_bt.shape[1], mask.k_positions_bs.shape[1]
    bq, bk, nq, nk = _sizes(t, s, block_q, block_k)
    plan = _block_plan(mask, bq, bk, nq, nk)
    in_range = (jnp.arange(nk)[None, :] >= plan.lo[:, None]) & (
        jnp.arange(nk)[None, :] < plan.hi[:, None]
    )
    return int(jnp.sum(in_range & (plan.kind != _EMPTY)))


# ---- splash: JAX's TPU kernel ------------------------------------------------------------------


def splash_attention(
    q_btnh: Array,
    k_bskh: Array,
    v_bskh: Array,
    mask: MaskSpec,
    interpret: bool | None = None,
    causal: bool = True,
    need_lse: bool = False,
) -> tuple[Array, Array | None]:
    """(out, fp32 logsumexp [B, T, N] if `need_lse` else None) of JAX's splash kernel: T
    queries over T keys, causal by index (chunked causal with a chunk size) or, with
    `causal=False`, every key of the same segment (a ring step over an earlier shard's keys).
    Positions must equal indices (module docstring). `interpret` (default: off TPU) runs the
    kernel in the Pallas interpreter. A query that sees no key gets the mean of v and a
    logsumexp near the fp32 minimum (splash's finite mask value), which `merge_partials` weighs
    as zero next to any real part."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel_lib,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as mask_lib,
    )

    b, t, n, h = q_btnh.shape
    if k_bskh.shape[1] != t:
        raise ValueError(f"splash attention is self-attention only; got T={t}, S={k_bskh.shape[1]}")
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    tp = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
    shape = (tp, tp)
    if not causal:
        one = mask_lib.FullMask(shape)
    elif mask.chunk_size is None:
        one = mask_lib.CausalMask(shape)
    else:
        one = mask_lib.ChunkedCausalMask(shape, mask.chunk_size)
    blocks = kernel_lib.BlockSizes(
        block_q=SPLASH_BLOCK,
        block_kv=SPLASH_BLOCK,
        block_kv_compute=SPLASH_BLOCK,
        block_q_dkv=SPLASH_BLOCK,
        block_kv_dkv=SPLASH_BLOCK,
        block_kv_dkv_compute=SPLASH_BLOCK,
        block_q_dq=SPLASH_BLOCK,
        block_kv_dq=SPLASH_BLOCK,
    )
    kernel = kernel_lib.make_splash_mha_single_device(
        mask_lib.MultiHeadMask([one] * n),
        block_sizes=blocks,
        interpret=interpret,
        save_residuals=need_lse,
    )
    # splash does not scale: fold head_dim^-0.5 into q (exact for powers of two head dims)
    q = _pad_to(q_btnh * jnp.asarray(h**-0.5, q_btnh.dtype), tp, 1, 0).transpose(0, 2, 1, 3)
    k = _pad_to(k_bskh, tp, 1, 0).transpose(0, 2, 1, 3)
    v = _pad_to(v_bskh, tp, 1, 0).transpose(0, 2, 1, 3)
    qs = _pad_to(mask.q_segments_bt.astype(jnp.int32), tp, 1, -2)
    ks = _pad_to(mask.k_segments_bs.astype(jnp.int32), tp, 1, -1)

    def one_row(q, k, v, qs, ks):
        result = kernel(q, k, v, segment_ids=kernel_lib.SegmentIds(qs, ks))
        return (result[0], result[1][0]) if need_lse else (result, None)  # lse [N, T]

    out, lse = jax.vmap(one_row)(q, k, v, qs, ks)  # [B, N, T, H], [B, N, T]
    out = out.transpose(0, 2, 1, 3)[:, :t].astype(q_btnh.dtype)
    if need_lse:
        lse = lse.transpose(0, 2, 1)[:, :t].astype(jnp.float32)
    return out, lse
