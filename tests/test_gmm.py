"""Tests for the Pallas grouped matmul kernels (CPU: Pallas TPU interpret mode)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l4jax.kernels import gmm, gmm_swiglu, make_group_schedule, tgmm


class Case(NamedTuple):
    m: int
    k: int
    n: int
    group_sizes: tuple[int, ...]
    tiling: tuple[int, int, int]


SMALL = (16, 16, 16)
CASES = {
    # empty first/middle/last groups, a group larger than a tile, sum < M, nothing divisible
    "uneven": Case(45, 40, 24, (0, 20, 0, 7, 13, 0), SMALL),
    # every row belongs to a group, one boundary on a tile edge
    "full": Case(64, 32, 16, (16, 30, 18), SMALL),
    # all groups fit in part of the first row tile, the rest of M is the zero tail
    "tiny_total": Case(37, 24, 20, (0, 5, 0), SMALL),
    # default MXU-sized tiles
    "default_tiles": Case(200, 136, 130, (70, 0, 100, 20), (128, 128, 128)),
}


def _inputs(case: Case, dtype: jnp.dtype, seed: int = 0) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    g = len(case.group_sizes)
    x = jnp.asarray(rng.standard_normal((case.m, case.k)), dtype)
    w = jnp.asarray(rng.standard_normal((g, case.k, case.n)) / np.sqrt(case.k), dtype)
    cot = jnp.asarray(rng.standard_normal((case.m, case.n)), dtype)
    return x, w, jnp.asarray(case.group_sizes, jnp.int32), cot


def _row_slices(group_sizes: jax.Array) -> list[slice]:
    ends = np.cumsum(np.asarray(group_sizes))
    return [slice(int(e - s), int(e)) for s, e in zip(np.asarray(group_sizes), ends, strict=True)]


def _ref_gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> np.ndarray:
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out = np.zeros((x.shape[0], w.shape[2]))
    for g, rows in enumerate(_row_slices(group_sizes)):
        out[rows] = x64[rows] @ w64[g]
    return out


def _ref_tgmm(x: jax.Array, dout: jax.Array, group_sizes: jax.Array) -> np.ndarray:
    x64, d64 = np.asarray(x, np.float64), np.asarray(dout, np.float64)
    return np.stack([x64[rows].T @ d64[rows] for rows in _row_slices(group_sizes)])


def _ref_gmm_grads(
    x: jax.Array, w: jax.Array, group_sizes: jax.Array, cot: jax.Array
) -> tuple[np.ndarray, np.ndarray]:
    w_t = np.swapaxes(np.asarray(w, np.float64), 1, 2)
    return _ref_gmm(cot, w_t, group_sizes), _ref_tgmm(x, cot, group_sizes)


def _close(actual: jax.Array, expected: np.ndarray, tol: float) -> None:
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(CASES))
def test_gmm_forward_fp32(name: str) -> None:
    case = CASES[name]
    x, w, gs, _ = _inputs(case, jnp.float32)
    out = gmm(x, w, gs, tiling=case.tiling)
    assert out.shape == (case.m, case.n)
    assert out.dtype == jnp.float32
    _close(out, _ref_gmm(x, w, gs), 1e-5)
    _close(out, np.asarray(jax.lax.ragged_dot(x, w, gs)), 1e-5)
    assert not np.any(np.asarray(out[int(np.sum(case.group_sizes)) :]))


def test_gmm_forward_bf16() -> None:
    case = CASES["uneven"]
    x, w, gs, _ = _inputs(case, jnp.bfloat16)
    out = gmm(x, w, gs, tiling=case.tiling)
    assert out.dtype == jnp.bfloat16
    _close(out, _ref_gmm(x, w, gs), 2e-2)
    _close(out, np.asarray(jax.lax.ragged_dot(x, w, gs), np.float64), 2e-2)
    # bf16 products are exact in fp32, so an fp32 output shows the fp32 accumulation.
    out32 = gmm(x, w, gs, tiling=case.tiling, preferred_element_type=jnp.dtype(jnp.float32))
    assert out32.dtype == jnp.float32
    _close(out32, _ref_gmm(x, w, gs), 1e-5)


def test_gmm_matches_megablox() -> None:
    """Ours and JAX's megablox kernel (both in interpret mode) on the same inputs and tiles:
    the same routed rows and the same gradients (megablox leaves rows past the groups unwritten,
    ours writes zeros there; `moe_impl="megablox"` masks them)."""
    from jax.experimental.pallas.ops.tpu import megablox

    case = CASES["uneven"]  # empty groups, rows past the groups, nothing divisible
    x, w, gs, cot = _inputs(case, jnp.float32)
    tm, tk, tn = case.tiling
    x_p = jnp.pad(x, ((0, -case.m % tm), (0, -case.k % tk)))  # megablox needs whole tiles
    w_p = jnp.pad(w, ((0, 0), (0, -case.k % tk), (0, -case.n % tn)))
    routed = int(np.sum(case.group_sizes))

    def theirs(a, b, g):  # rows past the groups: unwritten by megablox (also in the backward)
        routed_m = (jnp.arange(a.shape[0]) < routed)[:, None]
        out = megablox.gmm(
            jnp.where(routed_m, a, 0), b, g, jnp.float32, case.tiling, None, None, False, True
        )
        return jnp.where(routed_m, out, 0)

    ours_out = gmm(x, w, gs, tiling=case.tiling)
    their_out = theirs(x_p, w_p, gs)[: case.m, : case.n]
    np.testing.assert_allclose(ours_out, their_out, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(ours_out[:routed]))) > 0
    cot_p = jnp.pad(cot, ((0, x_p.shape[0] - case.m), (0, w_p.shape[2] - case.n)))
    ours_dx, ours_dw = jax.grad(
        _loss(lambda a, b, g: gmm(a, b, g, tiling=case.tiling), cot), (0, 1)
    )(x, w, gs)
    their_dx, their_dw = jax.grad(_loss(theirs, cot_p), (0, 1))(x_p, w_p, gs)
    np.testing.assert_allclose(ours_dx, their_dx[: case.m, : case.k], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours_dw, their_dw[:, : case.k, : case.n], rtol=1e-5, atol=1e-5)


def test_gmm_runs_the_pallas_kernel() -> None:
    x, w, gs, _ = _inputs(CASES["full"], jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda a, b: gmm(a, b, gs, tiling=SMALL))(x, w))
    assert "pallas_call" in jaxpr
    assert "ragged_dot" not in jaxpr


def _loss(fn: Callable[..., jax.Array], cot: jax.Array) -> Callable[..., jax.Array]:
    return lambda x, w, gs: jnp.sum(fn(x, w, gs).astype(jnp.float32) * cot)


@pytest.mark.parametrize("name", ["uneven", "tiny_total", "default_tiles"])
def test_gmm_grads_fp32(name: str) -> None:
    case = CASES[name]
    x, w, gs, cot = _inputs(case, jnp.float32)
    kernel_loss = _loss(lambda a, b, g: gmm(a, b, g, tiling=case.tiling), cot)
    dx, dw = jax.jit(jax.grad(kernel_loss, argnums=(0, 1)))(x, w, gs)
    ref_dx, ref_dw = jax.grad(_loss(jax.lax.ragged_dot, cot), argnums=(0, 1))(x, w, gs)
    loop_dx, loop_dw = _ref_gmm_grads(x, w, gs, cot)
    assert dx.shape == x.shape
    assert dw.shape == w.shape
    _close(dx, np.asarray(ref_dx), 1e-5)
    _close(dw, np.asarray(ref_dw), 1e-5)
    _close(dx, loop_dx, 1e-5)
    _close(dw, loop_dw, 1e-5)


def test_gmm_grads_bf16() -> None:
    case = CASES["uneven"]
    x, w, gs, cot = _inputs(case, jnp.bfloat16)
    kernel_loss = _loss(lambda a, b, g: gmm(a, b, g, tiling=case.tiling), cot)
    dx, dw = jax.grad(kernel_loss, argnums=(0, 1))(x, w, gs)
    assert dx.dtype == jnp.bfloat16
    assert dw.dtype == jnp.bfloat16
    loop_dx, loop_dw = _ref_gmm_grads(x, w, gs, cot)
    _close(dx, loop_dx, 5e-2)
    _close(dw, loop_dw, 5e-2)


@pytest.mark.parametrize(("name", "tiling"), [("uneven", (8, 128, 128)), ("full", SMALL)])
def test_tgmm(name: str, tiling: tuple[int, int, int]) -> None:
    case = CASES[name]
    x, _, gs, dout = _inputs(case, jnp.float32)
    out = tgmm(x, dout, gs, tiling=tiling)
    assert out.shape == (len(case.group_sizes), case.k, case.n)
    _close(out, _ref_tgmm(x, dout, gs), 1e-5)


def test_group_schedule_covers_rows_once() -> None:
    gs = jnp.asarray(CASES["uneven"].group_sizes, jnp.int32)
    m, tm, tiles_m = 45, 16, 3
    sched = jax.tree.map(np.asarray, make_group_schedule(gs, m, tm))
    assert sched.tile_ids.shape == (tiles_m + len(gs),)
    assert np.all(np.diff(sched.group_ids) >= 0)
    assert np.all(np.diff(sched.tile_ids) >= 0)
    assert set(sched.group_ids) == set(range(len(gs)))  # tgmm zeroes empty groups
    assert set(sched.tile_ids) == set(range(tiles_m))  # gmm writes every tile
    owner = np.full(m, -1)
    for g, t, start, end in zip(*sched, strict=True):
        assert t * tm <= start <= end <= (t + 1) * tm
        assert np.all(owner[start:end] == -1)
        owner[start:end] = g
    expected = np.repeat(np.arange(len(gs)), np.asarray(gs))
    np.testing.assert_array_equal(
        owner, np.pad(expected, (0, m - expected.size), constant_values=-1)
    )


def _unfused_swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, gs: jax.Array) -> jax.Array:
    return jax.nn.silu(jax.lax.ragged_dot(x, w_gate, gs)) * jax.lax.ragged_dot(x, w_up, gs)


def test_gmm_swiglu_forward_and_grads() -> None:
    case = CASES["uneven"]
    x, w_gate, gs, cot = _inputs(case, jnp.float32, seed=1)
    w_up = _inputs(case, jnp.float32, seed=2)[1]

    def loss(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
        return lambda *a: jnp.sum(fn(*a, gs) * cot)

    fused = jax.jit(lambda *a: gmm_swiglu(*a, tiling=case.tiling))
    _close(fused(x, w_gate, w_up, gs), np.asarray(_unfused_swiglu(x, w_gate, w_up, gs)), 1e-5)
    grads = jax.grad(loss(fused), argnums=(0, 1, 2))(x, w_gate, w_up)
    ref_grads = jax.grad(loss(_unfused_swiglu), argnums=(0, 1, 2))(x, w_gate, w_up)
    for got, want in zip(grads, ref_grads, strict=True):
        _close(got, np.asarray(want), 1e-5)


def test_gmm_swiglu_bf16() -> None:
    case = CASES["default_tiles"]
    x, w_gate, gs, _ = _inputs(case, jnp.bfloat16, seed=3)
    w_up = _inputs(case, jnp.bfloat16, seed=4)[1]
    out = gmm_swiglu(x, w_gate, w_up, gs)
    assert out.dtype == jnp.bfloat16
    ref = _unfused_swiglu(*(a.astype(jnp.float32) for a in (x, w_gate, w_up)), gs)
    _close(out, np.asarray(ref), 2e-2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernels_lower_for_tpu(dtype: jnp.dtype) -> None:
    """The non-interpret path lowers to Mosaic TPU custom calls (forward and both backward
    kernels) without a TPU attached; Mosaic's own compilation still needs a real TPU."""
    gs = jnp.asarray([100, 0, 156], jnp.int32)
    x, w = jnp.ones((256, 512), dtype), jnp.ones((3, 512, 384), dtype)

    def loss(x: jax.Array, w: jax.Array) -> jax.Array:
        out = gmm(x, w, gs, interpret=False) + gmm_swiglu(x, w, w, gs, interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    export = jax.export.export(jax.jit(jax.value_and_grad(loss, (0, 1))), platforms=["tpu"])
    # 2 forward kernels + gmm backward (gmm, tgmm) + swiglu backward (4 gmm, 2 tgmm)
    assert export(x, w).mlir_module().count("tpu_custom_call") == 2 + 2 + 6
