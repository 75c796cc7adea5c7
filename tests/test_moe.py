"""MoE dispatch pieces: the chunked grouped matmul (XLA:CPU path), local-expert offsets, and
the Pallas backend's fused SwiGLU (interpret mode)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l4jax import moe
from l4jax.kernels import gmm_swiglu
from l4jax.kernels.chunked_gmm import chunked_gmm, chunked_tgmm, make_chunk_schedule

# (group sizes, rows M, chunk sizes): empty first/middle/last groups, groups larger than the
# biggest chunk, rows past sum(group_sizes), sizes that are not powers of two
CASES = {
    "uneven": ((0, 20, 0, 7, 300, 0, 1), 340, (128, 64, 32, 16)),
    "one_group": ((45,), 45, (128, 64, 32, 16)),
    "odd_chunks": ((13, 0, 40, 2), 60, (12, 5)),
    "all_empty_but_last": ((0, 0, 0, 9), 16, (8,)),
}


def _inputs(case: str, dtype=jnp.float32, k: int = 24, n: int = 20, seed: int = 0):
    sizes, m, chunks = CASES[case]
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((len(sizes), k, n)) / np.sqrt(k), dtype)
    cot = jnp.asarray(rng.standard_normal((m, n)), dtype)
    return x, w, jnp.asarray(sizes, jnp.int32), cot, chunks


def _ref_gmm(x, w, sizes) -> np.ndarray:
    """Per-group Python loop in float64; rows past sum(sizes) are zero."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out, start = np.zeros((x.shape[0], w.shape[2])), 0
    for g, size in enumerate(np.asarray(sizes)):
        out[start : start + size] = x64[start : start + size] @ w64[g]
        start += size
    return out


def _ref_tgmm(x, dout, sizes) -> np.ndarray:
    x64, d64 = np.asarray(x, np.float64), np.asarray(dout, np.float64)
    ends = np.cumsum(np.asarray(sizes))
    return np.stack([x64[e - s : e].T @ d64[e - s : e] for s, e in zip(np.asarray(sizes), ends)])


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunk_schedule_covers_every_row_once(case):
    _, _, sizes, _, chunks = _inputs(case)
    m = CASES[case][1]
    owner = np.full(m, -1)
    for size, level in zip(chunks, make_chunk_schedule(sizes, m, chunks), strict=True):
        assert int(level.num_chunks) <= level.group_ids.shape[0]
        for i in range(int(level.num_chunks)):
            start, end = int(level.row_start[i]), int(level.row_end[i])
            rows = slice(start, min(start + size, end))
            assert np.all(owner[rows] == -1)
            owner[rows] = level.group_ids[i]
    want = np.repeat(np.arange(len(sizes)), np.asarray(sizes))
    np.testing.assert_array_equal(owner, np.pad(want, (0, m - want.size), constant_values=-1))


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_gmm_forward_and_grads_fp32(case):
    x, w, sizes, cot, chunks = _inputs(case)
    out = jax.jit(chunked_gmm, static_argnums=3)(x, w, sizes, chunks)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _ref_gmm(x, w, sizes), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, jax.lax.ragged_dot(x, w, sizes), rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w, sizes) * cot)

    dx, dw = jax.jit(jax.grad(loss(lambda *a: chunked_gmm(*a, chunks)), (0, 1)))(x, w)
    ref_dx, ref_dw = jax.grad(loss(jax.lax.ragged_dot), (0, 1))(x, w)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, _ref_tgmm(x, cot, sizes), rtol=1e-5, atol=1e-5)
    w_t = np.swapaxes(np.asarray(w, np.float64), 1, 2)
    np.testing.assert_allclose(dx, _ref_gmm(cot, w_t, sizes), rtol=1e-5, atol=1e-5)


def test_chunked_gmm_bf16_accumulates_in_fp32():
    x, w, sizes, cot, chunks = _inputs("uneven", jnp.bfloat16)
    out = jax.jit(chunked_gmm, static_argnums=3)(x, w, sizes, chunks)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float64), _ref_gmm(x, w, sizes), atol=3e-2)

    def loss(x, w):
        return jnp.sum((chunked_gmm(x, w, sizes, chunks) * cot).astype(jnp.float32))

    dx, dw = jax.jit(jax.grad(loss, (0, 1)))(x, w)
    assert (dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(dw, np.float64), _ref_tgmm(x, cot, sizes), atol=0.2)
    # bf16 products are exact in fp32: the fp32 weight gradient shows fp32 accumulation
    tg = jax.jit(chunked_tgmm)(x.astype(jnp.float32), cot.astype(jnp.float32), sizes)
    np.testing.assert_allclose(tg, _ref_tgmm(x, cot, sizes), rtol=1e-5, atol=1e-5)


def test_chunked_gmm_rejects_bad_shapes():
    x, w, sizes, _, _ = _inputs("uneven")
    with pytest.raises(ValueError, match="descending"):
        chunked_gmm(x, w, sizes, (16, 32))
    with pytest.raises(ValueError, match="do not fit"):
        chunked_gmm(x, w[:, :5], sizes)


def test_cpu_grouped_matmul_is_the_chunk_loop():
    """On CPU the `ragged_dot` backend compiles the chunk loop, not XLA's ragged-dot op."""
    x, w, sizes, _, _ = _inputs("uneven")
    hlo = jax.jit(moe.xla_grouped_matmul).lower(x, w, sizes).compile().as_text()
    assert "while" in hlo
    assert "ragged-dot" not in hlo
    np.testing.assert_allclose(
        moe.xla_grouped_matmul(x, w, sizes), _ref_gmm(x, w, sizes), rtol=1e-5, atol=1e-5
    )


# ---- local experts (expert parallelism's per-device work) -------------------------------------


def _moe_inputs(t=40, d=16, f=24, e=8, k=2, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    router = jnp.asarray(rng.standard_normal((d, e)), jnp.float32)
    shapes = [(e, d, f), (e, d, f), (e, f, d)]
    w = moe.ExpertWeights(*(jnp.asarray(rng.standard_normal(s) / 4, jnp.float32) for s in shapes))
    routing = moe.route(x, router, k)
    return x, routing, w


@pytest.mark.parametrize("impl", ["ragged_dot", "dense", "pallas", "megablox"])
def test_expert_shards_sum_to_all_experts(impl):
    """Each shard computes only the pairs routed to its experts; the shards add up."""
    x, r, w = _moe_inputs(t=24 if impl in ("pallas", "megablox") else 40)
    routed = jax.jit(moe.routed_experts, static_argnums=0)
    want = routed("dense", x, r.expert_ids_tk, r.scores_tk, w)
    parts = []
    for offset in (0, 4):
        local = moe.ExpertWeights(*(a[offset : offset + 4] for a in w))
        parts.append(routed(impl, x, r.expert_ids_tk, r.scores_tk, local, offset))
    assert float(jnp.max(jnp.abs(parts[0]))) > 0 and float(jnp.max(jnp.abs(parts[1]))) > 0
    np.testing.assert_allclose(parts[0] + parts[1], want, rtol=1e-5, atol=1e-5)


def test_pallas_backend_fuses_gate_and_up():
    x, r, w = _moe_inputs(t=16)
    jaxpr = str(
        jax.make_jaxpr(lambda x: moe.routed_experts("pallas", x, r.expert_ids_tk, r.scores_tk, w))(
            x
        )
    )
    assert jaxpr.count("pallas_call") == 2  # gmm_swiglu (gate, up, SiLU) + gmm (down)
    assert "ragged_dot" not in jaxpr


def test_gmm_swiglu_bf16_grads():
    """The fused kernel's backward in bf16 (fp32 recompute inside) against an fp32 reference."""
    x, w_gate, sizes, _, _ = _inputs("odd_chunks", jnp.bfloat16, k=40, n=24, seed=1)
    w_up = _inputs("odd_chunks", jnp.bfloat16, k=40, n=24, seed=2)[1]
    cot = jnp.asarray(np.random.default_rng(3).standard_normal((x.shape[0], 24)), jnp.float32)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cot)

    def fused(x, g, u):
        return gmm_swiglu(x, g, u, sizes, tiling=(16, 16, 16))

    def reference(x, g, u):
        return moe.unfused_swiglu(jax.lax.ragged_dot)(x, g, u, sizes)

    grads = jax.jit(jax.grad(loss(fused), (0, 1, 2)))(x, w_gate, w_up)
    f32 = [a.astype(jnp.float32) for a in (x, w_gate, w_up)]
    ref = jax.grad(loss(reference), (0, 1, 2))(*f32)
    for got, want in zip(grads, ref, strict=True):
        assert got.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2 * scale)


def test_pallas_grid_stops_at_the_routed_rows():
    """Rows past sum(group_sizes) (the other devices' experts' rows under expert parallelism)
    are off the kernels' grid and come out as zeros (gmm) / zero gradients (tgmm)."""
    from l4jax.kernels.gmm import active_visits, make_group_schedule, tgmm
    from l4jax.kernels.gmm import gmm as pallas_gmm

    sizes = jnp.asarray([0, 5, 0, 9, 0, 0], jnp.int32)  # 14 routed rows of 200
    sched = make_group_schedule(sizes, 200, 16)
    # of 13 row tiles + 6 group ends, only tile 0 and the ends of groups 0, 1, 2 start before row 14
    assert int(active_visits(sched, sizes, 200)) == 4
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((200, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((6, 24, 20)), jnp.float32)
    out = pallas_gmm(x, w, sizes, tiling=(16, 16, 16))
    np.testing.assert_allclose(out, _ref_gmm(x, w, sizes), rtol=1e-5, atol=1e-5)
    dw = tgmm(x, out, sizes, tiling=(16, 16, 16))
    np.testing.assert_allclose(dw, _ref_tgmm(x, out, sizes), rtol=1e-5, atol=1e-4)


def test_pallas_tiling_uses_big_tiles_where_dims_allow():
    assert moe.pallas_tiling(8192, 5120, 8192) == (512, 512, 512)
    assert moe.pallas_tiling(40, 200, 8192) == (128, 256, 512)
    assert moe.pallas_tiling(8192, 5120, 8192, groups=128) == (128, 512, 512)  # 64 rows/expert


def test_auto_backend_is_pallas_on_tpu_only(monkeypatch):
    from l4jax import preset

    assert preset("tiny").moe_impl == "auto"
    assert moe.resolve_impl("auto") == "ragged_dot"  # this CPU
    assert moe.resolve_impl("dense") == "dense"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert moe.resolve_impl("auto") == "pallas"
    assert moe.resolve_impl("ragged_dot") == "ragged_dot"
