"""Llama 4 mixture-of-experts: router and routed-expert backends behind one small interface.

    logits_te = x_td @ router_de                       # [T, E], raw logits
    top_v, top_i = top_k(logits_te, k)                 # [T, k]
    score_tk = sigmoid(top_v)                          # fp32, no softmax, no renormalisation
    y_td = sum_k Expert_{top_i}(score * x_td)          # the score scales the expert INPUT
    out_td = SharedExpert(x_td) + y_td

A backend computes the routed term `y_td` from `(x_td, expert_ids_tk, scores_tk, weights)`:
- `ragged_dot`: dropless sort-based dispatch: the T*k (token, expert) pairs are sorted by
  expert, the three expert matmuls are grouped matmuls (`jax.lax.ragged_dot`), and the outputs
  are gathered back into token order.
- `pallas`: the same dispatch with l4jax's own Pallas grouped-matmul kernel.
- `dense`: every expert on every token with a zero score for unselected ones, as the PyTorch
  references do. E times the work: an oracle for tests, never for real runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
# grouped matmul: (lhs [M, K], rhs [G, K, N], group_sizes [G] int32) -> [M, N]
GroupedMatmul = Callable[[Array, Array, Array], Array]


class ExpertWeights(NamedTuple):
    gate_edf: Array  # [E, D, F]
    up_edf: Array  # [E, D, F]
    down_efd: Array  # [E, F, D]


class Routing(NamedTuple):
    expert_ids_tk: Array  # [T, k] int32
    scores_tk: Array  # [T, k] float32, sigmoid of the top-k raw logits
    tokens_per_expert: Array  # [E] int32, for load-balance monitoring
    logits_te: Array  # [T, E] float32, raw router logits (for optional z-loss)


def route(x_td: Array, router_de: Array, top_k: int) -> Routing:
    """Top-k of the raw router logits, then a sigmoid of the chosen logits (fp32)."""
    num_experts = router_de.shape[-1]
    logits_te = jnp.einsum("td,de->te", x_td, router_de, preferred_element_type=jnp.float32)
    top_v, top_i = jax.lax.top_k(logits_te, top_k)
    counts_e = jnp.bincount(top_i.reshape(-1), length=num_experts).astype(jnp.int32)
    return Routing(top_i.astype(jnp.int32), jax.nn.sigmoid(top_v), counts_e, logits_te)


def swiglu_ffn(x, gate, up, down):
    """Dense SwiGLU: (silu(x @ gate) * (x @ up)) @ down, on [.., D] inputs."""
    h = jax.nn.silu(x @ gate) * (x @ up)
    return h @ down


# ---- sort-based dropless dispatch ------------------------------------------------------------


def sorted_experts(
    x_td: Array, expert_ids_tk: Array, scores_tk: Array, w: ExpertWeights, gmm: GroupedMatmul
) -> Array:
    """Dropless routed experts: sort (token, expert) pairs by expert, grouped matmuls, unsort."""
    t, k = expert_ids_tk.shape
    num_experts = w.gate_edf.shape[0]
    flat_e = expert_ids_tk.reshape(t * k)
    order = jnp.argsort(flat_e, stable=True)  # [T*k] pair index, sorted by expert
    group_sizes = jnp.bincount(flat_e, length=num_experts).astype(jnp.int32)
    scores_m = scores_tk.reshape(t * k)[order].astype(x_td.dtype)
    x_md = x_td[order // k] * scores_m[:, None]  # [T*k, D] expert inputs, grouped
    h_mf = jax.nn.silu(gmm(x_md, w.gate_edf, group_sizes)) * gmm(x_md, w.up_edf, group_sizes)
    y_md = gmm(h_mf, w.down_efd, group_sizes)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=order.dtype))
    return y_md[inverse].reshape(t, k, -1).sum(axis=1)


def _ragged_dot(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=lhs.dtype)


def _pallas_gmm(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    from l4jax.kernels import gmm  # imported lazily: Pallas is only needed on this path

    return gmm(lhs, rhs, group_sizes, preferred_element_type=lhs.dtype)


# ---- dense oracle ------------------------------------------------------------------------------


def dense_experts(x_td: Array, expert_ids_tk: Array, scores_tk: Array, w: ExpertWeights) -> Array:
    """Every expert on every token, unselected ones with score 0 (the PyTorch references)."""
    t = x_td.shape[0]
    num_experts = w.gate_edf.shape[0]
    score_te = jnp.zeros((t, num_experts), scores_tk.dtype)
    score_te = score_te.at[jnp.arange(t)[:, None], expert_ids_tk].set(scores_tk)
    x_etd = score_te.T.astype(x_td.dtype)[:, :, None] * x_td[None]
    gate = jnp.einsum("etd,edf->etf", x_etd, w.gate_edf)
    up = jnp.einsum("etd,edf->etf", x_etd, w.up_edf)
    return jnp.einsum("etf,efd->td", jax.nn.silu(gate) * up, w.down_efd)


BACKENDS: dict[str, Callable[[Array, Array, Array, ExpertWeights], Array]] = {
    "ragged_dot": lambda x, ids, s, w: sorted_experts(x, ids, s, w, _ragged_dot),
    "pallas": lambda x, ids, s, w: sorted_experts(x, ids, s, w, _pallas_gmm),
    "dense": dense_experts,
}


def routed_experts(
    impl: str, x_td: Array, expert_ids_tk: Array, scores_tk: Array, w: ExpertWeights
) -> Array:
    """The routed term of the MoE block with the chosen backend; [T, D] -> [T, D]."""
    return BACKENDS[impl](x_td, expert_ids_tk, scores_tk, w)
