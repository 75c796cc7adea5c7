"""Llama 4 text model, functional Flax Linen.

    h   = x + Attention(RMSNorm_in(x))
    out = h + FFN(RMSNorm_post(h))        # FFN = MoE on MoE layers, dense SwiGLU otherwise

The decoder is one `nn.scan` over groups of `config.scan_period` layers (4 for Scout and
Maverick: three RoPE/chunked layers and one NoPE/global layer), so compile time does not grow
with depth. Every parameter carries logical axis names; `sharding/rules.py` maps them to a mesh.
Shapes are in names: B batch, T query length, S key length, D hidden, N query heads,
K kv heads, G queries per kv head, H head_dim, E experts, F expert hidden, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from l4jax import context_parallel, expert_parallel, moe
from l4jax.attention import MaskSpec, attention, merge_partials, self_mask
from l4jax.config import LayerKind, Llama4Config
from l4jax.quantization import QArray, keep_quantized, quantize_int8

Array = jax.Array

REMAT_POLICY_FNS = {  # config.REMAT_POLICIES names -> jax.checkpoint policies
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

# logical axes of activations, constrained at layer boundaries (no-ops without rules)
ACT_BTD = ("activation_batch", "activation_length", "activation_embed")


# LoRA adapters (l4jax.post.lora) live in this variable collection, beside the weight they
# adapt: `{name}_a` [batch.., in.., r] and `{name}_b` [batch.., r, out..] (b already scaled)
LORA = "lora"


def lora_delta(a: Array, b: Array, w_ndim: int) -> Array:
    """A @ B over the rank axis, fp32, shaped like the adapted weight: `a` [batch.., in.., r],
    `b` [batch.., r, out..] (batch axes: stacked layers and/or experts)."""
    nb = a.ndim + b.ndim - w_ndim - 2
    ni, no = a.ndim - nb - 1, b.ndim - nb - 1
    letters = "abcdefghijkl"
    bt, i, o = letters[:nb], letters[nb : nb + ni], letters[nb + ni : nb + ni + no]
    return jnp.einsum(f"{bt}{i}r,{bt}r{o}->{bt}{i}{o}", a, b, preferred_element_type=jnp.float32)


def param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init):
    w = None
    if module.has_variable("params", name):  # a quantized weight (`l4jax.quantize`) is used
        value = module.get_variable("params", name)  # as it is: Flax would check its shape
        if isinstance(value, QArray):  # against `shape`, and packed int4 halves one dim
            w = value
    if w is None:
        cfg: Llama4Config = module.config
        boxed = nn.with_logical_partitioning(init, axes)
        w = module.param(name, boxed, shape, jnp.dtype(cfg.param_dtype))
    if module.has_variable(LORA, f"{name}_a"):
        # W + A @ B for this layer only (inside the layer scan), in fp32 so a bf16 base does not
        # round the update away; zero B gives W exactly. A quantized base (QLoRA) is
        # dequantized here, one layer at a time: the frozen weights stay quantized in memory
        a, b = module.get_variable(LORA, f"{name}_a"), module.get_variable(LORA, f"{name}_b")
        w = w.astype(jnp.float32) + lora_delta(a, b, len(w.shape))
    return w


def fan_in_init(fan_in: int):
    return nn.initializers.truncated_normal(stddev=fan_in**-0.5)


def rms_normalize(x: Array, eps: float) -> Array:
    """x * rsqrt(mean(x^2) + eps), computed in fp32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype)


class RMSNorm(nn.Module):
    config: Llama4Config

    @nn.compact
    def __call__(self, x_btd: Array) -> Array:
        scale = param(self, "scale", (x_btd.shape[-1],), ("norm",), nn.initializers.ones)
        return rms_normalize(x_btd, self.config.rms_norm_eps) * scale.astype(x_btd.dtype)


# ---- positions: RoPE, temperature tuning, masks --------------------------------------------


def rope_angles(config: Llama4Config, positions_bt: Array) -> tuple[Array, Array]:
    """cos, sin [B, T, H/2] in fp32 for interleaved (complex-pair) RoPE."""
    inv_freq = jnp.asarray(config.rope_inv_freq())  # [H/2] fp32, llama3-scaled
    angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_btnh: Array, cos_bth: Array, sin_bth: Array) -> Array:
    """Rotate pairs (x[2i], x[2i+1]) by the position's angle; fp32 math, x's dtype out."""
    x = x_btnh.astype(jnp.float32).reshape(*x_btnh.shape[:-1], -1, 2)
    re, im = x[..., 0], x[..., 1]
    cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x_btnh.shape).astype(x_btnh.dtype)


def temperature_scale(config: Llama4Config, positions_bt: Array) -> Array:
    """NoPE-layer query scale log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1, fp32."""
    pos = positions_bt.astype(jnp.float32)
    return jnp.log1p(jnp.floor((pos + 1.0) / config.floor_scale)) * config.attn_scale + 1.0


# ---- KV cache (l4jax.kv_cache): one {"k", "v"} [B, S, K, H] pair per layer ------------------
# Index i (the i-th token of a left-padded row) lives in slot i % S. Full caches have S >= every
# index; chunked layers only ever look back inside the current chunk, so S = attention_chunk_size
# (a ring) suffices. The position of a cached key is recovered from the query's position.

KV_CACHE_AXES = ("cache_batch", "cache_length", "cache_kv_heads", "cache_head_dim")
# global (NoPE) layers' caches hold the whole sequence: their length may be split over devices
# (context parallelism: the `sequence` axis) and decoding merges the shards' partial softmaxes
GLOBAL_KV_CACHE_AXES = ("cache_batch", "cache_global_length", "cache_kv_heads", "cache_head_dim")


def kv_cache_axes(chunked: bool) -> tuple[str, ...]:
    """Logical axes of one layer's [B, S, K, H] cache (chunked layers' rings stay whole)."""
    return KV_CACHE_AXES if chunked else GLOBAL_KV_CACHE_AXES


def constrain_cache(cache_bskh: Array | QArray, axes: tuple[str, ...]) -> Array | QArray:
    """The cache's sharding by its logical axes (an int8 cache's scales: head_dim is 1)."""
    if isinstance(cache_bskh, QArray):
        return QArray(
            nn.with_logical_constraint(cache_bskh.qvalue, axes),
            nn.with_logical_constraint(cache_bskh.scale, (*axes[:-1], None)),
        )
    return nn.with_logical_constraint(cache_bskh, axes)


def cache_slot_indices(cache_len: int, end: Array) -> Array:
    """[S] index held by each slot once indices 0..end-1 were written (slot = index % S), or -1."""
    slot = jnp.arange(cache_len, dtype=jnp.int32)
    last = end - 1 - slot
    return jnp.where(last >= 0, slot + cache_len * (last // cache_len), -1)


def write_cache(cache_bskh: Array | QArray, new_btkh: Array, start: Array | int) -> Array | QArray:
    """Store indices start .. start+T-1 at slots index % S (the last S of them if T > S). An
    int8 cache (a `QArray`, `l4jax.kv_cache`) stores them quantized, one fp32 scale per
    (token, kv head): each entry's own scale, so writing never rescales what is stored."""
    s, t = cache_bskh.shape[1], new_btkh.shape[1]
    if t > s:
        new_btkh, start, t = new_btkh[:, t - s :], start + (t - s), s
    if isinstance(cache_bskh, QArray):
        new = quantize_int8(new_btkh, contract_axes=(-1,))
        return QArray(
            write_cache(cache_bskh.qvalue, new.qvalue, start),
            write_cache(cache_bskh.scale, new.scale, start),
        )
    new_btkh = new_btkh.astype(cache_bskh.dtype)
    if t == s:  # every slot is written: entry j -> slot (start + j) % s
        return jnp.roll(new_btkh, start % s, axis=1)
    if t == 1:
        return jax.lax.dynamic_update_slice_in_dim(cache_bskh, new_btkh, start % s, 1)
    slots = (start + jnp.arange(t, dtype=jnp.int32)) % s
    return cache_bskh.at[:, slots].set(new_btkh)


def cache_mask(
    cache_len: int,
    held_end: Array,
    cache_index: Array,
    positions_bt: Array,
    chunk_size: int | None,
) -> MaskSpec:
    """Mask of queries at indices cache_index .. cache_index+T-1 over the S cached slots, which
    hold indices < held_end. A slot holding index i has position `p_last - (last - i)` (from
    the last query, which is never left padding); negative positions are the row's left padding
    and, like never-written slots, get segment -1 (never visible)."""
    t = positions_bt.shape[1]
    index_s = cache_slot_indices(cache_len, held_end)
    last = cache_index + t - 1
    k_positions_bs = positions_bt[:, -1:] - (last - index_s)[None, :]
    valid_bs = (index_s >= 0)[None, :] & (k_positions_bs >= 0)
    k_segments_bs = jnp.where(valid_bs, 1, -1).astype(jnp.int32)
    q_segments_bt = jnp.ones_like(positions_bt, jnp.int32)
    return MaskSpec(positions_bt, k_positions_bs, q_segments_bt, k_segments_bs, chunk_size)


def cached_attention(
    impl: str,
    q_btnh: Array,
    k_btkh: Array,
    v_btkh: Array,
    cache: dict[str, Array | QArray],
    cache_index: Array,
    positions_bt: Array,
    segments_bt: Array,
    chunk_size: int | None,
    cp: context_parallel.ContextParallel | None = None,
) -> tuple[Array, dict[str, Array]]:
    """T new tokens at indices cache_index.. attend to the cache and to themselves; the cache
    then stores them. One decode step (T == 1) writes first and attends over the cache; a
    prefill piece (T > 1) attends to the cache and to itself separately and merges the two by
    logsumexp, so the cache is never copied (a ring slot may be overwritten by the piece).
    Under context parallelism a global layer's cache is split over the sequence shards and
    both attend to it by flash-decoding (`ContextParallel.cache_attention`)."""
    k_cache, v_cache = cache["k"], cache["v"]
    s, t = k_cache.shape[1], q_btnh.shape[1]
    dtype = q_btnh.dtype

    def over_cache(k_cache, v_cache, held_end):
        k_all, v_all = k_cache.astype(dtype), v_cache.astype(dtype)
        mask = cache_mask(s, held_end, cache_index, positions_bt, chunk_size)
        parts = None
        if cp is not None and chunk_size is None:
            parts = cp.cache_attention(impl, q_btnh, k_all, v_all, mask)
        if parts is None:
            parts = attention(impl, q_btnh, k_all, v_all, mask, need_lse=t > 1)
        return parts

    if t == 1:
        k_cache = write_cache(k_cache, k_btkh, cache_index)
        v_cache = write_cache(v_cache, v_btkh, cache_index)
        out, _ = over_cache(k_cache, v_cache, cache_index + 1)
        return out, {"k": k_cache, "v": v_cache}
    past = over_cache(k_cache, v_cache, cache_index)
    own_mask = self_mask(positions_bt, segments_bt, chunk_size)
    own = attention(impl, q_btnh, k_btkh, v_btkh, own_mask, need_lse=True)
    out, _ = merge_partials([past, own])
    k_cache = write_cache(k_cache, k_btkh, cache_index)
    v_cache = write_cache(v_cache, v_btkh, cache_index)
    return out, {"k": k_cache, "v": v_cache}


# ---- modules -------------------------------------------------------------------------------


class Attention(nn.Module):
    config: Llama4Config
    kind: LayerKind

    @nn.compact
    def __call__(
        self,
        x_btd: Array,
        positions_bt: Array,
        segments_bt: Array,
        rope,
        cache: dict[str, Array | QArray] | None = None,
        cache_index: Array | None = None,
    ) -> tuple[Array, dict[str, Array] | None]:
        """-> (out [B, T, D], the updated cache or None without one).

        `cache` without `cache_index`: prefill (attend within the block, store it from index 0);
        with `cache_index`: the T tokens at indices cache_index.. (a decode step, or a piece of a
        chunked prefill) attend to the cache and themselves and are stored.
        """
        cfg = self.config
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        init = fan_in_init(d)
        wq = param(self, "q_proj", (d, n, h), ("embed", "q_heads", "head_dim"), init)
        wk = param(self, "k_proj", (d, k, h), ("embed", "kv_heads", "head_dim"), init)
        wv = param(self, "v_proj", (d, k, h), ("embed", "kv_heads", "head_dim"), init)
        wo = param(self, "o_proj", (n, h, d), ("q_heads", "head_dim", "embed"), fan_in_init(n * h))
        dtype = x_btd.dtype
        q = jnp.einsum("btd,dnh->btnh", x_btd, wq.astype(dtype))
        k_ = jnp.einsum("btd,dkh->btkh", x_btd, wk.astype(dtype))
        v = jnp.einsum("btd,dkh->btkh", x_btd, wv.astype(dtype))
        if self.kind.use_rope:
            q, k_ = apply_rope(q, *rope), apply_rope(k_, *rope)
            if cfg.use_qk_norm:  # weightless, after RoPE, RoPE layers only
                q, k_ = rms_normalize(q, cfg.rms_norm_eps), rms_normalize(k_, cfg.rms_norm_eps)
        elif cfg.attn_temperature_tuning:
            scale_bt = temperature_scale(cfg, positions_bt)
            q = (q.astype(jnp.float32) * scale_bt[:, :, None, None]).astype(dtype)
        chunk = cfg.attention_chunk_size if self.kind.chunked else None
        impl = cfg.attention_impl
        # the sequence split over the ambient mesh, if any (not while creating parameters,
        # which does not depend on it and may trace a short dummy sequence)
        layout = cfg.context_parallel_layout
        cp = None if self.is_initializing() else context_parallel.for_mesh(layout=layout)
        if cache is not None and cache_index is not None:
            out, cache = cached_attention(
                impl, q, k_, v, cache, cache_index, positions_bt, segments_bt, chunk, cp
            )
        else:
            # the first prefill piece of several may not split into the shards (e.g. shorter
            # than one chunk per shard): it attends as one array (`l4jax.decoding` checks that
            # a prompt prefilled in one piece splits; training's sequences must)
            if cp is not None and cache is not None and q.shape[1] % cp.length_multiple(chunk):
                cp = None
            if cp is not None:
                out = cp.self_attention(impl, q, k_, v, positions_bt, segments_bt, chunk)
            else:
                out, _ = attention(impl, q, k_, v, self_mask(positions_bt, segments_bt, chunk))
            if cache is not None:
                cache = {"k": write_cache(cache["k"], k_, 0), "v": write_cache(cache["v"], v, 0)}
        out = jnp.einsum("btnh,nhd->btd", out, wo.astype(dtype))
        if cache is not None:
            axes = kv_cache_axes(self.kind.chunked)
            cache = {n_: constrain_cache(c, axes) for n_, c in cache.items()}
        return out, cache


class MLP(nn.Module):
    """Dense SwiGLU feed-forward (dense layers, and the MoE's shared expert)."""

    config: Llama4Config
    hidden: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d, f = self.config.hidden_size, self.hidden
        gate = param(self, "gate_proj", (d, f), ("embed", "mlp"), fan_in_init(d))
        up = param(self, "up_proj", (d, f), ("embed", "mlp"), fan_in_init(d))
        down = param(self, "down_proj", (f, d), ("mlp", "embed"), fan_in_init(f))
        return moe.swiglu_ffn(x, gate.astype(x.dtype), up.astype(x.dtype), down.astype(x.dtype))


def router_z_loss(logits_te: Array) -> Array:
    """ST-MoE router z-loss: mean over tokens of logsumexp(router logits)^2, fp32."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_te.astype(jnp.float32), axis=-1)))


def load_balance_loss(routing: moe.Routing) -> Array:
    """Switch load-balance loss E * sum_e f_e * p_e: f_e the fraction of routed (token, expert)
    pairs sent to e, p_e the mean softmax router probability of e (1.0 when uniform)."""
    counts_e = routing.tokens_per_expert.astype(jnp.float32)
    f_e = counts_e / jnp.maximum(counts_e.sum(), 1.0)
    p_e = jnp.mean(jax.nn.softmax(routing.logits_te.astype(jnp.float32), axis=-1), axis=0)
    return counts_e.shape[0] * jnp.sum(f_e * p_e)


class MoE(nn.Module):
    """Router + routed experts (backend `config.moe_impl`) + always-on shared expert."""

    config: Llama4Config

    @nn.compact
    def __call__(self, x_btd: Array) -> Array:
        cfg = self.config
        d, e, f = cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size
        dtype = x_btd.dtype
        router = param(self, "router", (d, e), ("embed", "router_experts"), fan_in_init(d))
        weights = moe.ExpertWeights(
            param(self, "gate_proj", (e, d, f), ("expert", "embed", "mlp"), fan_in_init(d)),
            param(self, "up_proj", (e, d, f), ("expert", "embed", "mlp"), fan_in_init(d)),
            param(self, "down_proj", (e, f, d), ("expert", "mlp", "embed"), fan_in_init(f)),
        )
        # quantized experts stay quantized: the grouped matmuls dequantize block by block
        weights = moe.ExpertWeights(*(keep_quantized(w, dtype) for w in weights))
        x_td = x_btd.reshape(-1, d)
        if self.has_variable("routing", "expert_ids"):
            # routing replay (l4jax.post GRPO): the experts chosen during the rollout, with
            # this router's scores for them; XLA partitions this path as it can
            routing = moe.replay_route(
                x_td, router.astype(dtype), self.get_variable("routing", "expert_ids")
            )
            routed_td = moe.routed_experts(
                cfg.moe_impl, x_td, routing.expert_ids_tk, routing.scores_tk, weights
            )
        else:
            dispatch = expert_parallel.current_dispatch()  # one device, or expert-parallel
            routed_td, routing = dispatch(
                cfg.moe_impl, x_td, router.astype(dtype), cfg.num_experts_per_tok, weights
            )
        self.sow("intermediates", "tokens_per_expert", routing.tokens_per_expert)
        if self.is_mutable_collection("expert_choices"):  # recorded for routing replay
            self.sow("expert_choices", "expert_ids", routing.expert_ids_tk)
        if self.is_mutable_collection("losses"):  # optional router losses (l4jax.train)
            self.sow("losses", "router_z_loss", router_z_loss(routing.logits_te))
            self.sow("losses", "load_balance_loss", load_balance_loss(routing))
        shared_td = MLP(cfg, f, name="shared_expert")(x_td)
        return (shared_td + routed_td).reshape(x_btd.shape)


class DecoderLayer(nn.Module):
    config: Llama4Config
    kind: LayerKind

    @nn.compact
    def __call__(
        self,
        x_btd: Array,
        positions_bt: Array,
        segments_bt: Array,
        rope,
        cache=None,
        cache_index=None,
    ):
        """-> (x [B, T, D], the updated KV cache or None) (see `Attention`)."""
        cfg = self.config
        attn_in = RMSNorm(cfg, name="input_layernorm")(x_btd)
        attn, cache = Attention(cfg, self.kind, name="self_attn")(
            attn_in, positions_bt, segments_bt, rope, cache, cache_index
        )
        h = nn.with_logical_constraint(x_btd + attn, ACT_BTD)
        ffn_in = RMSNorm(cfg, name="post_attention_layernorm")(h)
        if self.kind.is_moe:
            ffn = MoE(cfg, name="feed_forward")
        else:
            ffn = MLP(cfg, cfg.intermediate_size_mlp, name="feed_forward")
        out = nn.with_logical_constraint(h + ffn(ffn_in), ACT_BTD)
        return out, cache


class DecoderGroup(nn.Module):
    """`scan_period` consecutive layers; the body of the layer scan."""

    config: Llama4Config

    @nn.compact
    def __call__(
        self,
        x_btd: Array,
        positions_bt: Array,
        segments_bt: Array,
        rope,
        cache=None,
        cache_index=None,
    ):
        """-> (x, None), or (x, this group's updated KV cache {"layer_{slot}": ...})."""
        kinds = self.config.layer_kinds[: self.config.scan_period]
        new_cache = None if cache is None else {}
        for slot, kind in enumerate(kinds):
            name = f"layer_{slot}"
            layer = DecoderLayer(self.config, kind, name=name)
            x_btd, layer_cache = layer(
                x_btd,
                positions_bt,
                segments_bt,
                rope,
                None if cache is None else cache[name],
                cache_index,
            )
            if cache is not None:
                new_cache[name] = layer_cache
        return x_btd, new_cache


def scanned_decoder(config: Llama4Config) -> type[nn.Module]:
    """DecoderGroup, remat-wrapped by policy, scanned over num_hidden_layers // scan_period."""
    body = DecoderGroup
    if config.remat_policy != "none":
        body = nn.remat(body, policy=REMAT_POLICY_FNS[config.remat_policy], prevent_cse=False)
    return nn.scan(
        body,
        variable_axes={
            "params": 0,
            "intermediates": 0,
            "losses": 0,
            LORA: 0,
            "routing": 0,
            "expert_choices": 0,
        },
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),  # cache per group
        length=config.num_hidden_layers // config.scan_period,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


OUTPUTS = ("logits", "last_logits", "hidden")


class Llama4ForCausalLM(nn.Module):
    """tokens [B, T] int32 -> logits [B, T, V] float32.

    `positions` [B, T] (default 0..T-1) are absolute positions; `segment_ids` [B, T] (default
    all ones) separate packed sequences, which never attend to each other.

    `method="forward"` also takes a KV cache (`l4jax.kv_cache.init_cache`) and returns
    `(output, cache or None)` (see there).
    """

    config: Llama4Config

    def __call__(
        self,
        tokens_bt: Array,
        positions_bt: Array | None = None,
        segment_ids_bt: Array | None = None,
        merge_embeds: Callable[[Array], Array] | None = None,
    ) -> Array:
        return self.forward(tokens_bt, positions_bt, segment_ids_bt, merge_embeds=merge_embeds)[0]

    @nn.compact
    def forward(
        self,
        tokens_bt: Array,
        positions_bt: Array | None = None,
        segment_ids_bt: Array | None = None,
        cache: dict[str, Any] | None = None,
        cache_index: Array | None = None,
        merge_embeds: Callable[[Array], Array] | None = None,
        output: str = "logits",
    ) -> tuple[Array, dict[str, Any] | None]:
        """-> (output, the updated KV cache or None without one).

        `output`: "logits" [B, T, V] fp32; "last_logits" [B, 1, V] of the last position only
        (prefill); "hidden" the final-normed hidden states [B, T, D] (`lm_head_weights` maps
        them to logits, e.g. blockwise in `l4jax.losses`).
        With a KV `cache` (`l4jax.kv_cache.init_cache`) and no `cache_index` the call is the
        prefill of a fresh cache (the block is stored from index 0); with `cache_index` [] int32
        the T tokens at indices cache_index.. (a decode step, or a piece of a chunked prefill)
        attend to the cache and are written to it.
        """
        cfg = self.config
        b, t = tokens_bt.shape
        if cache_index is not None and cache is None:
            raise ValueError("cache_index needs a cache")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones((b, t), jnp.int32)
        d, v = cfg.hidden_size, cfg.vocab_size
        embed = param(self, "embed_tokens", (v, d), ("vocab", "embed"), nn.initializers.normal(1.0))
        x = jnp.take(embed, tokens_bt, axis=0).astype(jnp.dtype(cfg.dtype))
        if merge_embeds is not None:  # e.g. image features replace <|patch|> embeddings
            x = merge_embeds(x)
        x = nn.with_logical_constraint(x, ACT_BTD)
        rope = rope_angles(cfg, positions_bt)
        x, cache = scanned_decoder(cfg)(cfg, name="layers")(
            x, positions_bt, segment_ids_bt, rope, cache, cache_index
        )
        x = RMSNorm(cfg, name="norm")(x)
        if cfg.tie_word_embeddings:
            head_dv = embed.T
        else:
            head_dv = param(self, "lm_head", (d, v), ("embed", "vocab"), fan_in_init(d))
        if output == "hidden":
            return x, cache
        if output == "last_logits":
            x = x[:, -1:]
        logits = jnp.einsum(
            "btd,dv->btv", x, head_dv.astype(x.dtype), preferred_element_type=jnp.float32
        )
        return logits, cache


def lm_head_weights(config: Llama4Config, params: dict[str, Any]) -> Array:
    """The output head [D, V] of `params` (the transposed embedding when tied)."""
    if config.tie_word_embeddings:
        return params["embed_tokens"].T
    return params["lm_head"]


def init_params(config: Llama4Config, rng: Array | int = 0, seq_len: int = 8) -> dict[str, Any]:
    """Random parameters (plain arrays, no partitioning boxes) for `config`."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    model = Llama4ForCausalLM(config)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return nn.unbox(jax.jit(model.init)(rng, tokens)["params"])


def param_logical_axes(config: Llama4Config) -> dict[str, Any]:
    """The logical axis names of every parameter, as a pytree of PartitionSpecs."""
    model = Llama4ForCausalLM(config)
    tokens = jnp.zeros((1, 8), jnp.int32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
    return nn.get_partition_spec(abstract)["params"]


def count_params(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
