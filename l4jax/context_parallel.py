"""Context parallelism: attention over a sequence split on the `sequence` mesh axis.

Outside attention every activation is split along its length by the logical rules
(`activation_length` -> `sequence`); here, per device, inside `shard_map`, with n shards of
L = T / n tokens each (L a whole multiple of `attention_chunk_size`):

    chunked (RoPE) layer:  out = attend(q_l, [halo, k_l])      halo = the previous shard's last
                                                               `chunk` keys (one ppermute)
    global (NoPE) layer:   ring: for step in 0..n-1            k, v of shard (r - step) mod n
                               part = attend(q_l, k, v)        skipped if that shard is later
                               out  = merge by logsumexp       (attention.merge_partials)
                               k, v = ppermute(k, v, +1)       (not after the last step)
    cache (decode step or  each shard's partial softmax over its slice of the cache, merged
    prefill piece):        by logsumexp with pmax / psum (flash-decoding)

Chunked layers: a query sees keys of its own chunk by *position*. With positions equal to
indices (unpacked rows) a shard holds whole chunks, so the halo block is entirely masked (the
blockwise backend skips it; `xla` computes and masks it: chunk x L scores). Packed documents
restart positions at 0 mid-row, so a document's chunk can straddle a shard boundary; it never
reaches further back than `chunk - 1` tokens, i.e. into the previous shard's last chunk, which
is what the halo carries. The halo is ~chunk / L of a shard's K/V: for Scout (chunk 8192) and
a 128K-token shard, 1/16.

Global layers: the ring moves (n - 1) K/V shards per device, as an all-gather of K/V does, but
holds two shards (this step's and the next) where the all-gather holds all n;
`exchange="all_gather"` keeps the simpler path for comparison (docs/long_context.md,
`benchmarks/long_context.py --cp`).
The ring has its own backward pass: the K/V shards go round again, each with its dK/dV
accumulator (autodiff of the forward scan kept every K/V shard that passed through: more
memory than the all-gather, docs/long_context.md), so training holds two K/V shards per
device too.

Causal load balance (`layout="zigzag"`, `config.context_parallel_layout`): in contiguous order
shard r finds work in r + 1 of the n ring steps, so the last shard's attention takes n - 1/2
shard-pairs of work while the first's takes 1/2, and every step waits for the slowest. In
zig-zag order a global layer's q, k, v, positions and segments move before the ring so that
shard r holds pieces r and 2n - 1 - r of 2n (`zigzag_order`), and the output moves back after
it, so every shard does half a shard-pair of work at every step (masks go by position: the
blockwise plan skips what a step's keys hide); chunked layers keep the contiguous order
(they are local). The price: those moves (`to_zigzag` / `from_zigzag`: two `ppermute`s of
half a shard per array), and the ring's steps run the position-masked backends, not splash
(its masks are by index). `benchmarks/long_context.py --cp-balance` computes both critical
paths from the blockwise block plan.

`for_mesh()` picks this path from the ambient mesh and logical rules
(`sharding.rules.mesh_context`); model code calls it explicitly. Written here rather than
taken from a library: JAX ships no ring attention, and MaxText's rejects chunked attention and
needs T divisible by n^2.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, PartitionSpec

from l4jax.attention import (
    BLOCK_K,
    BLOCK_Q,
    MaskSpec,
    attention,
    attention_grads,
    merge_partials,
    resolve_impl,
    self_mask,
    splash_attention,
    visited_blocks,
)
from l4jax.config import CONTEXT_PARALLEL_LAYOUTS
from l4jax.errors import ConfigError

Array = jax.Array
AxisNames = tuple[str, ...]
EXCHANGES = ("ring", "all_gather")


def _mesh_axes(logical: Sequence[str], rules, mesh: AbstractMesh) -> AxisNames:
    """The mesh axes (of size > 1, in order) that `logical` axes map to under `rules`."""
    names: list[str] = []
    for entry in nn.logical_to_mesh_axes(tuple(logical), rules):
        for name in (entry,) if isinstance(entry, str) else (entry or ()):
            if mesh.shape.get(name, 1) > 1 and name not in names:
                names.append(name)
    return tuple(names)


def _axes(names: AxisNames) -> AxisNames | None:
    return names if names else None


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """Attention with the sequence split over `seq_axes` of `mesh` (see the module docstring).

    `batch_axes`: mesh axes the rows are split over; `head_axes` / `kv_head_axes`: over which
    the query / kv heads are (tensor parallelism); all are kept as they are inside shard_map.
    """

    mesh: AbstractMesh
    seq_axes: AxisNames
    batch_axes: AxisNames = ()
    head_axes: AxisNames = ()
    kv_head_axes: AxisNames = ()
    exchange: str = "ring"
    layout: str = "contiguous"

    @classmethod
    def from_rules(
        cls, mesh: AbstractMesh, rules, exchange: str = "ring", layout: str = "contiguous"
    ) -> ContextParallel:
        if exchange not in EXCHANGES:
            raise ConfigError(
                f"context parallelism: exchange {exchange!r}; choose from {EXCHANGES}"
            )
        if layout not in CONTEXT_PARALLEL_LAYOUTS:
            raise ConfigError(
                f"context parallelism: layout {layout!r}; choose from {CONTEXT_PARALLEL_LAYOUTS}"
            )
        return cls(
            mesh,
            seq_axes=_mesh_axes(("activation_length",), rules, mesh),
            batch_axes=_mesh_axes(("activation_batch",), rules, mesh),
            head_axes=_mesh_axes(("activation_heads",), rules, mesh),
            kv_head_axes=_mesh_axes(("activation_kv_heads",), rules, mesh),
            exchange=exchange,
            layout=layout,
        )

    @property
    def shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.seq_axes)

    def _batch(self, b: int) -> AxisNames | None:
        """Row axes, or none (rows replicated) when B does not split over them (decode of one
        row on a data-parallel mesh)."""
        size = math.prod(self.mesh.shape[a] for a in self.batch_axes)
        return _axes(self.batch_axes) if b % size == 0 else None

    @property
    def zigzag(self) -> bool:
        """Global layers go round the ring in zig-zag order (`exchange="ring"` only)."""
        return self.layout == "zigzag" and self.exchange == "ring"

    def length_multiple(self, chunk_size: int | None) -> int:
        """The sequence lengths a model with this attention chunk (None: no chunked layers)
        can split into, as `check_length` asks of its layers, are the multiples of this: whole
        chunks per shard, and two pieces per shard in zig-zag order."""
        n = self.shards
        return math.lcm(n * (chunk_size or 1), 2 * n if self.zigzag else n)

    def check_length(self, t: int, chunk_size: int | None) -> None:
        """A sequence that does not divide into the shards (two pieces per shard in zig-zag
        order), or shards that are not whole multiples of the attention chunk, is a
        ConfigError naming both numbers."""
        n = self.shards
        if t % n:
            raise ConfigError(
                f"context parallelism: sequence length {t} does not divide into {n} shards "
                f"(mesh axes {list(self.seq_axes)})"
            )
        if self.zigzag and chunk_size is None and t % (2 * n):
            raise ConfigError(
                f"context parallelism: layout 'zigzag' splits sequence length {t} into "
                f"{2 * n} pieces ({n} shards); it does not divide"
            )
        if chunk_size is not None and (t // n) % chunk_size:
            raise ConfigError(
                f"context parallelism: shards of {t // n} tokens ({t} over {n} shards) are not "
                f"whole multiples of attention_chunk_size {chunk_size}"
            )

    def self_attention(
        self,
        impl: str,
        q_btnh: Array,
        k_btkh: Array,
        v_btkh: Array,
        positions_bt: Array,
        segments_bt: Array,
        chunk_size: int | None,
    ) -> Array:
        """Causal self-attention of a sequence-sharded block -> out [B, T, N, H]."""
        t = q_btnh.shape[1]
        self.check_length(t, chunk_size)
        # the backend for the whole problem (T x T), not a shard's: `auto` must not fall back
        # to the einsum path because a shard is short. Splash runs only in the ring's steps
        # (shard against shard, with its logsumexp); elsewhere a logsumexp is needed
        ring = chunk_size is None and self.exchange == "ring"
        impl = resolve_impl(impl, t, t, chunk_size is not None, need_lse=not ring)
        zigzag = ring and self.zigzag
        if zigzag and impl == "splash":  # splash's masks are by index: see the docstring
            impl = "blockwise"
        batch, seq = self._batch(q_btnh.shape[0]), _axes(self.seq_axes)
        q_spec = PartitionSpec(batch, seq, _axes(self.head_axes), None)
        kv_spec = PartitionSpec(batch, seq, _axes(self.kv_head_axes), None)
        bt_spec = PartitionSpec(batch, seq)
        if chunk_size is not None:
            local = functools.partial(_chunked_local, impl, chunk_size, self.seq_axes, self.shards)
        elif zigzag:
            local = functools.partial(_zigzag_ring, impl, self.seq_axes, self.shards)
        elif self.exchange == "ring":
            local = functools.partial(_ring, impl, self.seq_axes, self.shards, True)
        else:
            local = functools.partial(_gather_local, impl, self.seq_axes)
        run = jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(q_spec, kv_spec, kv_spec, bt_spec, bt_spec),
            out_specs=q_spec,
            check_vma=False,  # the blockwise custom VJP carries no varying-axis types
        )
        return run(q_btnh, k_btkh, v_btkh, positions_bt.astype(jnp.int32), segments_bt)

    def cache_attention(
        self, impl: str, q_btnh: Array, k_bskh: Array, v_bskh: Array, mask: MaskSpec
    ) -> tuple[Array, Array] | None:
        """Flash-decoding: T query tokens (a decode step, or a prefill piece) over a cache of S
        slots split over the sequence shards -> (out [B, T, N, H], fp32 logsumexp [B, T, N]);
        None when S does not divide into the shards (the caller then attends over the whole
        cache). Each shard reads only its own slots: a piece never gathers the cache."""
        if k_bskh.shape[1] % self.shards:
            return None
        batch, seq = self._batch(q_btnh.shape[0]), _axes(self.seq_axes)
        q_spec = PartitionSpec(batch, None, _axes(self.head_axes), None)
        kv_spec = PartitionSpec(batch, seq, _axes(self.kv_head_axes), None)
        mask_spec = MaskSpec(
            PartitionSpec(batch, None), PartitionSpec(batch, seq), PartitionSpec(batch, None),
            PartitionSpec(batch, seq), None,
        )  # fmt: skip
        run = jax.shard_map(
            functools.partial(_cache_local, impl, self.seq_axes, mask.chunk_size),
            mesh=self.mesh,
            in_specs=(q_spec, kv_spec, kv_spec, tuple(mask_spec[:4])),
            out_specs=(q_spec, PartitionSpec(*q_spec[:3])),
            check_vma=False,
        )
        return run(q_btnh, k_bskh, v_bskh, tuple(x.astype(jnp.int32) for x in mask[:4]))


def for_mesh(exchange: str = "ring", layout: str = "contiguous") -> ContextParallel | None:
    """Context parallelism for the ambient mesh (`jax.set_mesh`) and logical rules, if its
    `activation_length` axes have more than one device and are not already manual; else None."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or mesh.manual_axes or not rules:
        return None
    cp = ContextParallel.from_rules(mesh, rules, exchange, layout)
    return cp if cp.seq_axes else None


def zigzag_order(t: int, n: int) -> np.ndarray:
    """Token indices in zig-zag order: the sequence cut into 2n equal pieces, shard r holding
    pieces r and 2n - 1 - r (an early and a late one), so every causal ring step has the same
    work on every shard: the order `to_zigzag` gives the shards."""
    pieces = np.arange(t).reshape(2 * n, t // (2 * n))
    return np.concatenate([np.concatenate([pieces[r], pieces[2 * n - 1 - r]]) for r in range(n)])


def ring_work(
    t: int, n: int, layout: str, block_q: int = BLOCK_Q, block_k: int = BLOCK_K
) -> np.ndarray:
    """[step, shard] (query block, key block) pairs the blockwise backend computes in one
    causal global layer's ring of n shards over T tokens of one document (the block plan's
    own count, `attention.visited_blocks`); a step lasts as long as its busiest shard."""
    order = zigzag_order(t, n) if layout == "zigzag" else np.arange(t)
    pos = jnp.asarray(order.reshape(n, 1, t // n), jnp.int32)
    one = jnp.ones((1, t // n), jnp.int32)
    work = np.zeros((n, n), np.int64)
    for i in range(n):
        for r in range(n):
            mask = MaskSpec(pos[r], pos[(r - i) % n], one, one, None)
            work[i, r] = visited_blocks(mask, block_q, block_k)
    return work


# ---- per device, inside shard_map ----------------------------------------------------------


def _shift(x: Array, axes: AxisNames, n: int) -> Array:
    """x from the previous shard along the ring (shard r receives shard r - 1's)."""
    return jax.lax.ppermute(x, axes, [(i, (i + 1) % n) for i in range(n)])


def _zigzag_piece_home(p: int, n: int) -> int:
    """The shard that holds piece p of 2n in zig-zag order (as its first or second half)."""
    return p if p < n else 2 * n - 1 - p


def to_zigzag(x: Array, axes: AxisNames, n: int) -> Array:
    """Inside shard_map over `axes` (n shards), x [B, L, ...]: shard r's contiguous block
    (pieces 2r, 2r + 1 of 2n) -> its zig-zag block (pieces r, 2n - 1 - r). Each half moves
    with one `ppermute`; an even shard's first half is the one that came from a first half."""
    half = x.shape[1] // 2
    from_first = jax.lax.ppermute(
        x[:, :half], axes, [(r, _zigzag_piece_home(2 * r, n)) for r in range(n)]
    )
    from_second = jax.lax.ppermute(
        x[:, half:], axes, [(r, _zigzag_piece_home(2 * r + 1, n)) for r in range(n)]
    )
    even = jax.lax.axis_index(axes) % 2 == 0
    return jnp.concatenate(
        [jnp.where(even, from_first, from_second), jnp.where(even, from_second, from_first)],
        axis=1,
    )


def from_zigzag(x: Array, axes: AxisNames, n: int) -> Array:
    """The inverse of `to_zigzag`."""
    half = x.shape[1] // 2
    even = jax.lax.axis_index(axes) % 2 == 0
    to_first = jnp.where(even, x[:, :half], x[:, half:])
    to_second = jnp.where(even, x[:, half:], x[:, :half])
    first = jax.lax.ppermute(to_first, axes, [(_zigzag_piece_home(2 * r, n), r) for r in range(n)])
    second = jax.lax.ppermute(
        to_second, axes, [(_zigzag_piece_home(2 * r + 1, n), r) for r in range(n)]
    )
    return jnp.concatenate([first, second], axis=1)


def _zigzag_ring(impl, axes, n, q, k, v, pos, seg) -> Array:
    q, k, v, pos, seg = (to_zigzag(x, axes, n) for x in (q, k, v, pos, seg))
    return from_zigzag(_ring(impl, axes, n, False, q, k, v, pos, seg), axes, n)


def _chunked_local(impl, chunk, axes, n, q, k, v, pos, seg) -> Array:
    own = attention(impl, q, k, v, self_mask(pos, seg, chunk), need_lse=True)
    with jax.named_scope("cp_halo"):
        hk, hv, hp, hs = (_shift(x[:, -chunk:], axes, n) for x in (k, v, pos, seg))
        hs = jnp.where(jax.lax.axis_index(axes) == 0, -1, hs)  # shard 0 has no predecessor
        halo = attention(impl, q, hk, hv, MaskSpec(pos, hp, seg, hs, chunk), need_lse=True)
    return merge_partials([own, halo])[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _ring(impl, axes, n, contiguous, q, k, v, pos, seg) -> Array:
    return _ring_forward(impl, axes, n, contiguous, q, k, v, pos, seg)[0]


def _skipping(contiguous: bool, r: Array, i: Array, n: int, f, nothing):
    """f, or `nothing` where ring step i brings shard r keys that none of its queries may
    see: a later shard's, in contiguous order (in zig-zag order every step has work)."""
    if not contiguous:
        return f
    return lambda kv: jax.lax.cond((r - i) % n <= r, f, nothing, kv)


def _ring_forward(impl, axes, n, contiguous, q, k, v, pos, seg) -> tuple[Array, Array]:
    """-> (out, fp32 logsumexp) of this shard's queries over every shard's keys. With `splash`
    (contiguous order only) the diagonal step runs its causal mask and the others its full one
    (an earlier shard's keys all precede this shard's queries; segments still apply), by index
    like splash elsewhere."""
    r = jax.lax.axis_index(axes)
    b, t, heads, _ = q.shape

    def attend(kv, diagonal=False):
        kk, vv, kp, ks = kv
        mask = MaskSpec(pos, kp, seg, ks, None)
        if impl == "splash":
            return splash_attention(q, kk, vv, mask, causal=diagonal, need_lse=True)
        return attention(impl, q, kk, vv, mask, need_lse=True)

    def empty(kv):  # a later shard's keys: never visible to a causal query
        return jnp.zeros_like(q), jnp.full((b, t, heads), -jnp.inf, jnp.float32)

    def step(carry, i):  # receive shard (r - i) mod n's block, attend unless it is later
        acc, kv = carry
        kv = tuple(_shift(x, axes, n) for x in kv)
        part = _skipping(contiguous, r, i, n, attend, empty)(kv)
        return (merge_partials([acc, part]), kv), None

    # a scan, not an unrolled loop, so each step reuses the previous step's buffers
    with jax.named_scope("cp_ring"):
        acc = attend((k, v, pos, seg), diagonal=True)
        (acc, _), _ = jax.lax.scan(step, (acc, (k, v, pos, seg)), jnp.arange(1, n))
    return acc


def _ring_fwd(impl, axes, n, contiguous, q, k, v, pos, seg):
    out, lse = _ring_forward(impl, axes, n, contiguous, q, k, v, pos, seg)
    return out, (q, k, v, pos, seg, out, lse)


def _ring_bwd(impl, axes, n, contiguous, residuals, dout):
    """The K/V blocks go round the ring again, each with its fp32 dK/dV accumulator; every
    shard adds its queries' share (`attention_grads`, from the saved output and logsumexp) and
    passes both on; one last shift brings each accumulator home. Autodiff of the forward scan
    kept every K/V block that passed through (more than an all-gather's memory); this keeps
    two.
    (Whatever `impl` ran forward, splash included, the gradient is the blockwise flash
    backward's: the same math, masked by position.)"""
    q, k, v, pos, seg, out, lse = residuals
    r = jax.lax.axis_index(axes)

    def grads(kv):
        kk, vv, kp, ks = kv
        return attention_grads(q, kk, vv, MaskSpec(pos, kp, seg, ks, None), out, lse, dout)

    def nothing(kv):
        kk, vv, _, _ = kv
        return (
            jnp.zeros(q.shape, jnp.float32),
            jnp.zeros(kk.shape, jnp.float32),
            jnp.zeros(vv.shape, jnp.float32),
        )

    def step(carry, i):  # the same order as the forward: shard (r - i) mod n's block
        dq, kv, (dk, dv) = carry
        kv = tuple(_shift(x, axes, n) for x in kv)
        dk, dv = _shift(dk, axes, n), _shift(dv, axes, n)
        dq_i, dk_i, dv_i = _skipping(contiguous, r, i, n, grads, nothing)(kv)
        return (dq + dq_i, kv, (dk + dk_i, dv + dv_i)), None

    with jax.named_scope("cp_ring_grad"):
        dq, dk, dv = grads((k, v, pos, seg))
        carry = (dq, (k, v, pos, seg), (dk, dv))
        (dq, _, (dk, dv)), _ = jax.lax.scan(step, carry, jnp.arange(1, n))
        # shard r now holds shard r + 1's accumulators: one more step brings them home
        dk, dv = _shift(dk, axes, n), _shift(dv, axes, n)
    zeros = tuple(np.zeros(x.shape, jax.dtypes.float0) for x in (pos, seg))
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *zeros)


_ring.defvjp(_ring_fwd, _ring_bwd)


def _gather_local(impl, axes, q, k, v, pos, seg) -> Array:
    kk, vv, kp, ks = (jax.lax.all_gather(x, axes, axis=1, tiled=True) for x in (k, v, pos, seg))
    return attention(impl, q, kk, vv, MaskSpec(pos, kp, seg, ks, None))[0]


def _cache_local(impl, axes, chunk, q, k, v, mask_arrays) -> tuple[Array, Array]:
    out, lse = attention(impl, q, k, v, MaskSpec(*mask_arrays, chunk), need_lse=True)
    m = jax.lax.pmax(lse, axes)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m)  # 0 for a shard that sees no key
    num = jax.lax.psum(out.astype(jnp.float32) * w[..., None], axes)
    den = jax.lax.psum(w, axes)
    seen = den > 0
    out = (num / jnp.where(seen, den, 1.0)[..., None]).astype(q.dtype)
    return out, jnp.where(seen, m + jnp.log(jnp.where(seen, den, 1.0)), -jnp.inf)
