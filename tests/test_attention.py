"""Attention backends (l4jax.attention) against the einsum oracle; exact far-out positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l4jax import Llama4ForCausalLM, init_params, preset
from l4jax.attention import (
    MaskSpec,
    blockwise_attention,
    merge_partials,
    self_mask,
    splash_attention,
    visited_blocks,
    xla_attention,
)
from l4jax.errors import ConfigError
from l4jax.model import rope_angles, temperature_scale

RNG = np.random.default_rng(0)


def _qkv(b, t, n, kv, h, s=None):
    s = t if s is None else s
    q = jnp.asarray(RNG.standard_normal((b, t, n, h)), jnp.float32)
    k = jnp.asarray(RNG.standard_normal((b, s, kv, h)), jnp.float32)
    v = jnp.asarray(RNG.standard_normal((b, s, kv, h)), jnp.float32)
    return q, k, v


def _layout(b, t, pad=None, packed_at=None):
    """positions, segments [B, T]: plain, left-padded rows (pad[b] tokens), or two packed docs."""
    idx = np.arange(t)
    pos, seg = np.tile(idx, (b, 1)), np.ones((b, t), np.int32)
    for r, p in enumerate(pad or []):
        pos[r], seg[r, :p] = np.maximum(idx - p, 0), 0
    if packed_at is not None:
        pos[:, packed_at:], seg[:, packed_at:] = idx[packed_at:] - packed_at, 2
    return jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32)


def _value_and_grads(fn, q, k, v, mask):
    """(out, lse or None), grads of a fixed random linear function of out (and lse)."""
    out, lse = jax.jit(lambda q, k, v: fn(q, k, v, mask))(q, k, v)  # (mask: static chunk)
    rng = np.random.default_rng(1)
    w_out = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    w_lse = None if lse is None else jnp.asarray(rng.standard_normal(lse.shape), jnp.float32)

    def loss(q, k, v):
        o, lse_ = fn(q, k, v, mask)
        return jnp.sum(o * w_out) + (0.0 if lse_ is None else jnp.sum(lse_ * w_lse))

    return (out, lse), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


CASES = {  # name: (b, t, n, kv, chunk, pad, packed_at)
    "chunked_odd_length": (2, 77, 4, 2, 16, None, None),
    "causal_gqa4": (1, 70, 8, 2, None, None, None),
    "mha_chunk_edges": (1, 64, 2, 2, 32, None, None),
    "left_padded_chunked": (3, 61, 4, 2, 16, [0, 9, 30], None),
    "left_padded_causal": (2, 45, 4, 1, None, [0, 17], None),
    "packed_chunked": (2, 66, 6, 3, 16, None, 23),
    "packed_causal": (1, 66, 4, 2, None, None, 23),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_blockwise_equals_xla_forward_and_gradients(case):
    b, t, n, kv, chunk, pad, packed_at = CASES[case]
    q, k, v = _qkv(b, t, n, kv, 16)
    mask = self_mask(*_layout(b, t, pad, packed_at), chunk)

    def blockwise(q, k, v, m):  # small blocks: many blocks, skipped ones, a ragged last one
        return blockwise_attention(q, k, v, m, block_q=16, block_k=8)

    (ref, ref_lse), ref_g = _value_and_grads(xla_attention, q, k, v, mask)
    (got, got_lse), got_g = _value_and_grads(blockwise, q, k, v, mask)
    np.testing.assert_allclose(got, ref, atol=2e-6)
    np.testing.assert_allclose(got_lse, ref_lse, atol=2e-6)
    for g, r in zip(got_g, ref_g):
        np.testing.assert_allclose(g, r, atol=1e-5)


@pytest.mark.parametrize("case", ["chunked_odd_length", "causal_gqa4", "packed_causal"])
def test_splash_interpret_equals_xla_forward_and_gradients(case):
    """Splash's masks are index-based: exact whenever positions are indices (no left padding;
    packing only on global layers, whose causal mask does not care where a document starts)."""
    b, t, n, kv, chunk, pad, packed_at = CASES[case]
    q, k, v = _qkv(b, t, n, kv, 16)
    mask = self_mask(*_layout(b, t, pad, packed_at), chunk)

    def splash(q, k, v, m):
        return splash_attention(q, k, v, m, interpret=True)

    def oracle(q, k, v, m):
        return xla_attention(q, k, v, m)[0], None

    (ref, _), ref_g = _value_and_grads(oracle, q, k, v, mask)
    (got, _), got_g = _value_and_grads(splash, q, k, v, mask)
    np.testing.assert_allclose(got, ref, atol=2e-6)
    for g, r in zip(got_g, ref_g):
        np.testing.assert_allclose(g, r, atol=1e-5)


def test_blockwise_skips_blocks_the_mask_empties():
    """Causal: nq (nq + 1) / 2 block pairs; chunked: only the pairs inside a chunk."""
    t = 256
    pos, seg = _layout(1, t)
    assert visited_blocks(self_mask(pos, seg, None), 32, 32) == 8 * 9 // 2
    assert visited_blocks(self_mask(pos, seg, 64), 32, 32) == 4 * 3  # per chunk: 1 + 2
    assert visited_blocks(self_mask(pos, seg, 64), 64, 64) == 4


def test_partials_over_split_keys_merge_to_the_whole():
    q, k, v = _qkv(2, 20, 4, 2, 16, s=50)
    qpos = jnp.asarray(np.tile(np.arange(30, 50), (2, 1)), jnp.int32)
    kpos = jnp.asarray(np.tile(np.arange(50), (2, 1)), jnp.int32)
    ones_q, ones_k = jnp.ones_like(qpos), jnp.ones_like(kpos)
    whole = blockwise_attention(q, k, v, MaskSpec(qpos, kpos, ones_q, ones_k, None), 8, 8)
    parts = [
        xla_attention(
            q, k[:, a:z], v[:, a:z], MaskSpec(qpos, kpos[:, a:z], ones_q, ones_k[:, a:z], None)
        )
        for a, z in ((0, 17), (17, 50))
    ]
    out, lse = merge_partials(parts)
    np.testing.assert_allclose(out, whole[0], atol=2e-6)
    np.testing.assert_allclose(lse, whole[1], atol=2e-6)


@pytest.mark.slow
def test_model_backends_agree_with_packing_and_left_padding():
    """The whole model: logits and parameter gradients of `blockwise` equal `xla`'s."""
    cfg = preset("tiny")
    params = init_params(cfg, rng=2)
    tokens = jnp.asarray(RNG.integers(0, 512, (2, 96)), jnp.int32)
    pos, seg = _layout(2, 96, pad=[0, 13], packed_at=None)
    pos = pos.at[0, 50:].set(jnp.arange(46)).astype(jnp.int32)  # row 0: two packed documents
    seg = seg.at[0, 50:].set(2)

    def loss(params, impl):
        logits = Llama4ForCausalLM(cfg.replace(attention_impl=impl)).apply(
            {"params": params}, tokens, pos, seg
        )
        return jnp.sum(jnp.where(seg[..., None] > 0, logits, 0.0) ** 2) / 1e3, logits

    grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, ref), ref_g = grads(params, "xla")
    (_, got), got_g = grads(params, "blockwise")
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], atol=1e-4)
    for g, r in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)


def test_attention_impl_is_validated_and_stays_out_of_the_hf_config():
    with pytest.raises(ConfigError, match="attention_impl"):
        preset("tiny", attention_impl="flash")
    cfg = preset("tiny", attention_impl="blockwise")
    assert "attention_impl" not in cfg.to_hf_dict()


# ---- positions: exact from int32 in fp32 up to 2^24 ----------------------------------------


def test_temperature_buckets_exact_at_floor_edges_and_near_10m():
    cfg = preset("scout")
    assert cfg.floor_scale == 8192
    positions = np.concatenate(
        [
            np.arange(8170, 8200),
            np.arange(10_000_000 - 20, 10_000_000 + 20),
            [2**24 - 8193, 2**24 - 8192, 2**24 - 1, 16_000_000],
        ]
    ).astype(np.int64)
    got = np.asarray(temperature_scale(cfg, jnp.asarray(positions[None], jnp.int32)))[0]
    bucket = np.floor((positions + 1) / 8192.0)  # float64: exact integers
    want = np.log1p(bucket) * cfg.attn_scale + 1.0
    np.testing.assert_allclose(got, want, rtol=2e-7)
    # 8176..8190 are bucket 0, 8191 the first of bucket 1 (bf16 positions get this wrong)
    edge = np.asarray(temperature_scale(cfg, jnp.arange(8176, 8192, dtype=jnp.int32)[None]))[0]
    assert np.all(edge[:-1] == 1.0) and edge[-1] > 1.0


def test_rope_angles_exact_near_10m():
    """Angles are fp32(pos) * inv_freq correctly rounded (as PyTorch computes them), from exact
    int32 positions; cos/sin of them agree with float64 numpy."""
    cfg = preset("scout")
    positions = np.array([8191, 8192, 1_048_575, 9_999_999, 10_000_000, 10_485_759, 2**24 - 1])
    cos, sin = rope_angles(cfg, jnp.asarray(positions[None], jnp.int32))
    inv = cfg.rope_inv_freq()
    angles32 = positions.astype(np.float32)[:, None] * inv[None, :]  # numpy: correctly rounded
    assert np.all(positions.astype(np.float32).astype(np.int64) == positions)
    np.testing.assert_allclose(cos[0], np.cos(angles32.astype(np.float64)), atol=2e-6)
    np.testing.assert_allclose(sin[0], np.sin(angles32.astype(np.float64)), atol=2e-6)
