"""Llama 4 mixture-of-experts: router and routed-expert backends behind one small interface.

    logits_te = x_td @ router_de                       # [T, E], raw logits
    top_v, top_i = top_k(logits_te, k)                 # [T, k]
    score_tk = sigmoid(top_v)                          # fp32, no softmax, no renormalisation
    y_td = sum_k Expert_{top_i}(score * x_td)          # the score scales the expert INPUT
    out_td = SharedExpert(x_td) + y_td

A backend computes the routed term `y_td` from `(x_td, expert_ids_tk, scores_tk, weights)`
(`config.moe_impl`):
- `ragged_dot`: dropless sort-based dispatch: the T*k (token, expert) pairs are sorted by
  expert, the three expert matmuls are grouped matmuls, and the outputs are scattered back into
  token order. The grouped matmul is `jax.lax.ragged_dot` on TPU/GPU; on CPU, where XLA lowers
  ragged_dot to a dense masked matmul over every expert, it is `kernels.chunked_gmm` (a loop
  over row chunks of one expert each, work proportional to the routed rows).
- `pallas`: the same dispatch with l4jax's own Pallas kernels: `gmm_swiglu` (gate and up
  projections and SiLU in one pass) and `gmm` (down projection).
- `megablox`: the same dispatch on JAX's own grouped matmul,
  `jax.experimental.pallas.ops.tpu.megablox` (gate and up as two calls; interpret mode off TPU),
  for TPU users until l4jax's kernels are measured there (docs/moe.md: what ours adds).
- `dense`: every expert on every token with a zero score for unselected ones, as the PyTorch
  references do. E times the work: an oracle for tests, never for real runs.
- `gather`: each (token, expert) pair gathers its expert's weights; reads T*k experts instead
  of E. For decode steps (`l4jax.generate` uses it while batch * k < E), never for long inputs.

Where the routed term runs is a `Dispatch`: `local_dispatch` computes it on one device;
`l4jax.expert_parallel.current_dispatch` picks it or the expert-parallel one for the ambient
mesh.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

from l4jax.errors import ConfigError
from l4jax.quantization import QArray, as_dense

Array = jax.Array
# grouped matmul: (lhs [M, K], rhs [G, K, N], group_sizes [G] int32) -> [M, N]
GroupedMatmul = Callable[[Array, Array, Array], Array]
# grouped SwiGLU: (x [M, D], gate [G, D, F], up [G, D, F], group_sizes [G]) -> [M, F]
GroupedSwiglu = Callable[[Array, Array, Array, Array], Array]


class ExpertWeights(NamedTuple):
    """Plain arrays, or `QArray`s (`l4jax.quantize`) that every backend dequantizes per expert
    block, tile or gathered pair, never all experts at once (`dense`, the test oracle, does)."""

    gate_edf: Array | QArray  # [E, D, F]
    up_edf: Array | QArray  # [E, D, F]
    down_efd: Array | QArray  # [E, F, D]


class Routing(NamedTuple):
    expert_ids_tk: Array  # [T, k] int32
    scores_tk: Array  # [T, k] float32, sigmoid of the top-k raw logits
    tokens_per_expert: Array  # [E] int32, for load-balance monitoring
    logits_te: Array  # [T, E] float32, raw router logits (for optional z-loss)


def route(x_td: Array, router_de: Array, top_k: int) -> Routing:
    """Top-k of the raw router logits, then a sigmoid of the chosen logits (fp32)."""
    logits_te = jnp.einsum("td,de->te", x_td, router_de, preferred_element_type=jnp.float32)
    top_v, top_i = jax.lax.top_k(logits_te, top_k)
    top_i = top_i.astype(jnp.int32)
    counts_e = expert_counts(top_i, router_de.shape[-1])
    return Routing(top_i, jax.nn.sigmoid(top_v), counts_e, logits_te)


def replay_route(x_td: Array, router_de: Array, expert_ids_tk: Array) -> Routing:
    """`route` with the experts given (routing replay): their sigmoid scores from this router."""
    logits_te = jnp.einsum("td,de->te", x_td, router_de, preferred_element_type=jnp.float32)
    top_v = jnp.take_along_axis(logits_te, expert_ids_tk, axis=-1)
    counts_e = expert_counts(expert_ids_tk, router_de.shape[-1])
    return Routing(expert_ids_tk, jax.nn.sigmoid(top_v), counts_e, logits_te)


def expert_counts(expert_ids_tk: Array, num_experts: int, valid_t: Array | None = None) -> Array:
    """[E] int32: (token, expert) pairs routed to each expert, counting only `valid_t` tokens."""
    weights = (
        None if valid_t is None else jnp.repeat(valid_t.astype(jnp.int32), expert_ids_tk.shape[1])
    )
    counts = jnp.bincount(expert_ids_tk.reshape(-1), weights, length=num_experts)
    return counts.astype(jnp.int32)


def swiglu_ffn(x, gate, up, down):
    """Dense SwiGLU: (silu(x @ gate) * (x @ up)) @ down, on [.., D] inputs."""
    h = jax.nn.silu(x @ gate) * (x @ up)
    return h @ down


def local_expert_ids(expert_ids: Array, expert_offset: Array | int, num_local: int) -> Array:
    """Expert ids counted from this device's first expert (`expert_offset`), `num_local` for
    the experts held elsewhere (expert parallelism; all are local on one device)."""
    local = expert_ids - expert_offset
    return jnp.where((local >= 0) & (local < num_local), local, num_local)


# ---- sort-based dropless dispatch ------------------------------------------------------------


class GroupedOps(NamedTuple):
    """The grouped matmuls of one backend (rows sorted by expert, `group_sizes [G]` int32)."""

    matmul: GroupedMatmul  # (lhs [M, K], rhs [G, K, N], group_sizes) -> [M, N]
    swiglu: GroupedSwiglu  # (x [M, D], gate [G, D, F], up [G, D, F], group_sizes) -> [M, F]


def sorted_experts(
    x_td: Array,
    expert_ids_tk: Array,
    scores_tk: Array,
    w: ExpertWeights,
    ops: GroupedOps,
    expert_offset: Array | int = 0,
) -> Array:
    """Dropless routed experts: sort (token, expert) pairs by expert, grouped matmuls, unsort.

    `w` holds experts `expert_offset .. expert_offset + E_local - 1` (all of them on one
    device; one shard under expert parallelism). Pairs routed to other experts sort last, past
    `sum(group_sizes)`, where the grouped matmuls give zeros: they add nothing here.
    """
    t, k = expert_ids_tk.shape
    num_local = w.gate_edf.shape[0]
    key_m = local_expert_ids(expert_ids_tk.reshape(t * k), expert_offset, num_local)
    order = jnp.argsort(key_m, stable=True)  # [T*k] pair index, sorted by expert
    group_sizes = jnp.bincount(key_m, length=num_local + 1)[:num_local].astype(jnp.int32)
    scores_m = scores_tk.reshape(t * k)[order].astype(x_td.dtype)
    x_md = x_td[order // k] * scores_m[:, None]  # [T*k, D] expert inputs, grouped
    h_mf = ops.swiglu(x_md, w.gate_edf, w.up_edf, group_sizes)
    y_md = ops.matmul(h_mf, w.down_efd, group_sizes)
    y_pairs = jnp.zeros_like(y_md).at[order].set(y_md, unique_indices=True)
    return y_pairs.reshape(t, k, -1).sum(axis=1)


def unfused_swiglu(matmul: GroupedMatmul) -> GroupedSwiglu:
    def swiglu(x_md: Array, gate: Array, up: Array, group_sizes: Array) -> Array:
        return jax.nn.silu(matmul(x_md, gate, group_sizes)) * matmul(x_md, up, group_sizes)

    return swiglu


def _native_ragged_dot(lhs: Array, rhs: Array | QArray, group_sizes: Array) -> Array:
    if isinstance(rhs, QArray):
        from l4jax.kernels.quantized import quantized_ragged_dot

        return quantized_ragged_dot(lhs, rhs, group_sizes)
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=lhs.dtype)


def xla_grouped_matmul(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    """`jax.lax.ragged_dot`, except on CPU: XLA:CPU lowers ragged_dot to a dense masked matmul
    over every group (G times the work), so there the chunk loop `chunked_gmm` runs instead.

    The platform is read when tracing (`jax.default_backend()`), like the Pallas kernels'
    interpret mode, not with `jax.lax.platform_dependent`: that is a `cond`, whose outputs
    are new values, so inside the scanned layers the backward pass's residuals (each layer's
    expert weights) would be stacked into one more copy of all expert weights per train step.
    """
    from l4jax.kernels.chunked_gmm import chunked_gmm  # lazily, like the Pallas kernels

    grouped_matmul = chunked_gmm if jax.default_backend() == "cpu" else _native_ragged_dot
    return grouped_matmul(lhs, rhs, group_sizes)


def pallas_tiling(m: int, k: int, n: int, groups: int = 1) -> tuple[int, int, int]:
    """MXU tiles (tm, tk, tn) for the Pallas kernels over `m` rows in `groups` experts: 512
    where the dims allow, else the dim rounded up to 128; tm at most the mean rows per expert
    (rounded up to 128), since a row tile that straddles experts is multiplied once per expert.
    A 128^3 step is far shorter than the ~0.35 us fixed cost of a Pallas grid step and only
    reaches 64 FLOP/byte; 512^3 reaches 256 (see benchmarks/README.md)."""

    def tile(d: int) -> int:
        return min(512, -(-d // 128) * 128)

    return tile(-(-m // groups)), tile(k), tile(n)


def _our_kernel(dense: Callable, quantized: Callable, x_md: Array, weights, group_sizes: Array):
    """`dense(x_md, *weights, group_sizes)` on MXU tiles for these shapes, or `quantized` (tiles
    dequantized in VMEM) when the weights are `QArray`s."""
    w = weights[0]
    tiling = pallas_tiling(x_md.shape[0], x_md.shape[1], w.shape[2], w.shape[0])
    kernel = quantized if isinstance(w, QArray) else dense
    return kernel(x_md, *weights, group_sizes, tiling=tiling, preferred_element_type=x_md.dtype)


def _pallas_gmm(lhs: Array, rhs: Array | QArray, group_sizes: Array) -> Array:
    from l4jax.kernels import gmm, qgmm  # imported lazily: Pallas is only needed on this path

    return _our_kernel(gmm, qgmm, lhs, (rhs,), group_sizes)


def _pallas_swiglu(x_md: Array, gate: Array, up: Array, group_sizes: Array) -> Array:
    from l4jax.kernels import gmm_swiglu, qgmm_swiglu  # gate and up in one pass, SiLU fused

    return _our_kernel(gmm_swiglu, qgmm_swiglu, x_md, (gate, up), group_sizes)


def _megablox_gmm(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    """JAX's megablox grouped matmul with our semantics: any M, K, N (padded to its tiles here)
    and zeros past `sum(group_sizes)`, also in the gradient (megablox leaves those rows
    unwritten)."""
    from jax.experimental.pallas.ops.tpu import megablox  # lazily, like our Pallas kernels

    if isinstance(rhs, QArray):
        raise ConfigError(
            "moe_impl='megablox': JAX's megablox takes no quantized experts; use 'pallas' "
            "(tiles dequantized in VMEM) or 'ragged_dot'"
        )
    (m, k), n = lhs.shape, rhs.shape[2]
    tm, tk, tn = tiling = pallas_tiling(m, k, n, rhs.shape[0])
    routed_m = jnp.arange(m) < jnp.sum(group_sizes)
    # masked on the way in too: megablox's backward leaves the gradient of unrouted rows
    # unwritten, and this `where`'s VJP drops it (a product would keep a NaN)
    lhs = jnp.where(routed_m[:, None], lhs, 0)
    lhs_p = jnp.pad(lhs, ((0, -m % tm), (0, -k % tk)))
    rhs_p = jnp.pad(rhs, ((0, 0), (0, -k % tk), (0, -n % tn)))
    interpret = jax.default_backend() != "tpu"
    # positional: megablox's custom_vjp takes dtype, tiling, transpose_rhs, interpret by position
    out = megablox.gmm(lhs_p, rhs_p, group_sizes, lhs.dtype, tiling, None, None, False, interpret)
    return jnp.where(routed_m[:, None], out[:m, :n], 0)


XLA_OPS = GroupedOps(xla_grouped_matmul, unfused_swiglu(xla_grouped_matmul))
PALLAS_OPS = GroupedOps(_pallas_gmm, _pallas_swiglu)
MEGABLOX_OPS = GroupedOps(_megablox_gmm, unfused_swiglu(_megablox_gmm))


# ---- per-pair gather (decoding) ---------------------------------------------------------------


def gathered_experts(
    x_td: Array,
    expert_ids_tk: Array,
    scores_tk: Array,
    w: ExpertWeights,
    expert_offset: Array | int = 0,
) -> Array:
    """Each (token, expert) pair gathers its own expert's weights: T*k expert reads, not E.

    For decoding (T*k below E: `l4jax.generate` picks it then), where the step is bound by
    reading weights; it copies T*k expert matrices, so never use it for long inputs.
    """
    t, k = expert_ids_tk.shape
    num_local = w.gate_edf.shape[0]
    local_m = local_expert_ids(expert_ids_tk.reshape(t * k), expert_offset, num_local)
    valid_m = local_m < num_local
    local_m = jnp.where(valid_m, local_m, 0)
    scores_m = jnp.where(valid_m, scores_tk.reshape(t * k), 0).astype(x_td.dtype)
    x_md = jnp.repeat(x_td, k, axis=0) * scores_m[:, None]
    dtype = x_td.dtype  # a quantized expert is dequantized per gathered pair
    gate = jnp.einsum("md,mdf->mf", x_md, as_dense(w.gate_edf[local_m], dtype))
    up = jnp.einsum("md,mdf->mf", x_md, as_dense(w.up_edf[local_m], dtype))
    down = as_dense(w.down_efd[local_m], dtype)
    y_md = jnp.einsum("mf,mfd->md", jax.nn.silu(gate) * up, down)
    return y_md.reshape(t, k, -1).sum(axis=1)


# ---- dense oracle ------------------------------------------------------------------------------


def dense_experts(
    x_td: Array,
    expert_ids_tk: Array,
    scores_tk: Array,
    w: ExpertWeights,
    expert_offset: Array | int = 0,
) -> Array:
    """Every expert on every token, unselected ones with score 0 (the PyTorch references)."""
    t = x_td.shape[0]
    num_local = w.gate_edf.shape[0]
    local_tk = local_expert_ids(expert_ids_tk, expert_offset, num_local)
    score_te = jnp.zeros((t, num_local), scores_tk.dtype)
    score_te = score_te.at[jnp.arange(t)[:, None], local_tk].add(scores_tk, mode="drop")
    x_etd = score_te.T.astype(x_td.dtype)[:, :, None] * x_td[None]
    w = ExpertWeights(*(as_dense(a, x_td.dtype) for a in w))  # an oracle: all experts at once
    gate = jnp.einsum("etd,edf->etf", x_etd, w.gate_edf)
    up = jnp.einsum("etd,edf->etf", x_etd, w.up_edf)
    return jnp.einsum("etf,efd->td", jax.nn.silu(gate) * up, w.down_efd)


# (x_td, expert_ids_tk, scores_tk, weights, expert_offset) -> routed term [T, D]
Backend = Callable[[Array, Array, Array, ExpertWeights, "Array | int"], Array]
BACKENDS: dict[str, Backend] = {
    "ragged_dot": functools.partial(sorted_experts, ops=XLA_OPS),
    "pallas": functools.partial(sorted_experts, ops=PALLAS_OPS),
    "megablox": functools.partial(sorted_experts, ops=MEGABLOX_OPS),
    "dense": dense_experts,
    "gather": gathered_experts,
}


def resolve_impl(impl: str) -> str:
    """The backend `impl` names: `auto` is the Pallas kernels on TPU, `ragged_dot` elsewhere."""
    if impl != "auto":
        return impl
    return "pallas" if jax.default_backend() == "tpu" else "ragged_dot"


def routed_experts(
    impl: str,
    x_td: Array,
    expert_ids_tk: Array,
    scores_tk: Array,
    w: ExpertWeights,
    expert_offset: Array | int = 0,
) -> Array:
    """The routed term of the MoE block with the chosen backend, on this device; [T, D] -> [T, D].

    `w` holds the experts from `expert_offset` on (all of them unless expert-parallel).
    """
    backend = BACKENDS[resolve_impl(impl)]
    return backend(x_td, expert_ids_tk, scores_tk, w, expert_offset=expert_offset)


# ---- dispatch: where the router and the routed experts run -----------------------------------


class Dispatch(Protocol):
    """Routes `x_td` and computes the routed term with all experts of `w`, however the work is
    spread over devices: `(impl, x_td, router_de, top_k, w) -> (routed_td [T, D], Routing)`.
    `local_dispatch` is the single-device one."""

    def __call__(
        self, impl: str, x_td: Array, router_de: Array, top_k: int, w: ExpertWeights
    ) -> tuple[Array, Routing]: ...


def local_dispatch(
    impl: str, x_td: Array, router_de: Array, top_k: int, w: ExpertWeights
) -> tuple[Array, Routing]:
    """Route, then the routed experts with backend `impl`, on this device."""
    routing = route(x_td, router_de, top_k)
    return routed_experts(impl, x_td, routing.expert_ids_tk, routing.scores_tk, w), routing
