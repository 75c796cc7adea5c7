"""Quantized weights (`l4jax.quantize`): Meta's int4 and fp8 recipes and per-channel int8.

Exactness: a quantized model's logits equal those of the same model whose weights were
quantized and dequantized here in numpy (Meta's formulas, written out independently of
l4jax), on every MoE backend; the numpy int4 is checked against llama_models' own
`int4_row_quantize`. Coverage: on the real Scout and Maverick configs (abstract trees) int4
quantizes >= 94% of the parameters and every routed-expert weight. Expert parallelism: the
int4 forward on 8 simulated devices equals the single-device one.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import l4jax
from l4jax import preset
from l4jax.kernels import qgmm, qgmm_swiglu
from l4jax.kernels.chunked_gmm import chunked_gmm
from l4jax.kernels.quantized import quantized_ragged_dot
from l4jax.model import Llama4ForCausalLM, init_params, param_logical_axes
from l4jax.quantization import (
    EXPERT_NAMES,
    QArray,
    dequantize,
    logical_axes,
    nbytes,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    quantized_leaves,
)

# K = 128 on every quantized weight, so int4 uses Meta's group of 128; all layer kinds
CONFIG = preset(
    "tiny",
    hidden_size=128,
    intermediate_size=128,
    intermediate_size_mlp=256,
    num_experts_per_tok=2,
    dtype="float32",
    param_dtype="float32",
)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 8)), jnp.int32)


# ---- the numpy reference (Meta's formulas) ------------------------------------------------------


def np_int4(w: np.ndarray, group: int = 128) -> np.ndarray:
    """Meta's int4_row_quantize on [..., K, N] (groups along K), dequantized, fp32."""
    w = np.moveaxis(w.astype(np.float32), -2, -1)  # [..., N, K] as Meta's [N, K]
    g = w.reshape(*w.shape[:-1], -1, group)
    scale = np.maximum(np.abs(g).max(-1, keepdims=True), np.float32(1e-6)) / np.float32(8)
    q = np.clip(np.round(g / scale), -8, 7)  # np.round: half to even, as torch.round
    return np.moveaxis((q * scale).reshape(w.shape), -1, -2)


def np_int8(w: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    w = w.astype(np.float32)
    scale = np.maximum(np.abs(w).max(axes, keepdims=True), np.float32(1e-6)) * np.float32(1 / 127)
    return np.clip(np.round(w / scale), -127, 127) * scale


def np_fp8(w: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """fbgemm quantize_fp8_per_row: a * (448 / max|a|) clamped, to e4m3, scale 1 / that."""
    w = w.astype(np.float32)
    inv = np.float32(448) / np.maximum(np.abs(w).max(axes, keepdims=True), np.float32(1e-12))
    q = np.clip(w * inv, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return q * (np.float32(1) / inv)


def np_dequantized_params(params, mode: str):
    """The params with exactly the weights of `mode` replaced by their numpy round trip."""
    out = jax.tree.map(np.asarray, params)
    for slot, kind in enumerate(CONFIG.layer_kinds[: CONFIG.scan_period]):
        layer = out["layers"][f"layer_{slot}"]
        ffn = layer["feed_forward"]
        names = ("gate_proj", "up_proj", "down_proj")
        if kind.is_moe and mode in ("int4", "fp8"):
            for n in names:
                ffn[n] = np_int4(ffn[n]) if mode == "int4" else np_fp8(ffn[n], (2,))
            if mode == "int4":
                for n in names:
                    ffn["shared_expert"][n] = np_int4(ffn["shared_expert"][n])
        if mode == "int8":
            mlps = [ffn, ffn["shared_expert"]] if kind.is_moe else [ffn]
            for mlp in mlps:
                for n in names:
                    mlp[n] = np_int8(mlp[n], (mlp[n].ndim - 2,))
            attn = layer["self_attn"]
            for n in ("q_proj", "k_proj", "v_proj"):
                attn[n] = np_int8(attn[n], (1,))
            attn["o_proj"] = np_int8(attn["o_proj"], (1, 2))
    if mode == "int8" and "lm_head" in out:
        out["lm_head"] = np_int8(out["lm_head"], (0,))
    return out


def _meta_int4_row_quantize():
    """llama_models' `int4_row_quantize`, taken from its source: the module imports fbgemm_gpu
    (CUDA only) at the top, the function itself is plain torch."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None:
        pytest.skip("llama_models is not installed")
    torch = pytest.importorskip("torch")
    source = (Path(spec.origin).parent / "quantize_impls.py").read_text()
    fn = next(
        n
        for n in ast.parse(source).body
        if isinstance(n, ast.FunctionDef) and n.name == "int4_row_quantize"
    )
    namespace = {"torch": torch, "Tuple": tuple}
    exec(compile(ast.Module([fn], []), "quantize_impls.py", "exec"), namespace)
    return namespace["int4_row_quantize"], torch


def test_numpy_int4_matches_llama_models():
    meta_quantize, torch = _meta_int4_row_quantize()
    w_nk = np.random.default_rng(1).standard_normal((48, 384)).astype(np.float32)
    w_nk[3, :128] = 0.0  # an all-zero group: the 1e-6 clamp
    w_nk[5, 7] = 1.5 * np.abs(w_nk[5, :128]).max()  # ties and clamping at the group max
    q, scales = meta_quantize(torch.from_numpy(w_nk))
    meta = (q.float().reshape(48, 3, 128) * scales.t().reshape(48, 3, 1)).reshape(48, 384)
    np.testing.assert_array_equal(np_int4(w_nk.T).T, meta.numpy())
    ours = quantize_int4(jnp.asarray(w_nk.T))  # [K, N] layout
    np.testing.assert_array_equal(np.asarray(ours.scale), scales.numpy())
    np.testing.assert_array_equal(np.asarray(dequantize(ours, jnp.float32)), meta.numpy().T)


@pytest.mark.parametrize("mode", ["int4", "int8", "fp8"])
def test_formats_round_trip_like_numpy(mode):
    w = np.random.default_rng(2).standard_normal((3, 256, 40)).astype(np.float32) * 0.05
    w[1, :, 4] = 0.0
    if mode == "int4":
        q, want = quantize_int4(jnp.asarray(w)), np_int4(w)
        assert q.qvalue.dtype == jnp.uint8 and q.qvalue.shape == (3, 128, 40)
        assert q.scale.shape == (3, 2, 40) and q.shape == w.shape
    elif mode == "int8":
        q, want = quantize_int8(jnp.asarray(w), (1,)), np_int8(w, (1,))
        assert q.qvalue.dtype == jnp.int8 and q.scale.shape == (3, 1, 40)
    else:
        q, want = quantize_fp8(jnp.asarray(w), (1,)), np_fp8(w, (1,))
        assert q.qvalue.dtype == jnp.float8_e4m3fn and q.scale.shape == (3, 1, 40)
    assert q.mode == mode
    np.testing.assert_array_equal(np.asarray(q.astype(jnp.float32)), want)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, 0)


@pytest.mark.parametrize("mode", ["int4", "int8", "fp8"])
def test_quantized_logits_equal_numpy_dequantized_model(params, mode):
    want = Llama4ForCausalLM(CONFIG).apply({"params": np_dequantized_params(params, mode)}, TOKENS)
    full = Llama4ForCausalLM(CONFIG).apply({"params": params}, TOKENS)
    assert float(jnp.max(jnp.abs(want - full))) > 1e-4  # quantization did change the model
    got = Llama4ForCausalLM(CONFIG).apply({"params": l4jax.quantize(params, CONFIG, mode)}, TOKENS)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_quantize_recipes_pick_meta_weights(params):
    def names(mode):
        return {n for n, _ in quantized_leaves(l4jax.quantize(params, CONFIG, mode))}

    moe_slots = [s for s, k in enumerate(CONFIG.layer_kinds[: CONFIG.scan_period]) if k.is_moe]
    routed = {
        f"layers/layer_{s}/feed_forward/{n}"
        for s in moe_slots
        for n in ("gate_proj", "up_proj", "down_proj")
    }
    shared = {n.replace("feed_forward/", "feed_forward/shared_expert/") for n in routed}
    assert names("fp8") == routed
    assert names("int4") == routed | shared
    int8 = names("int8")
    assert routed | shared <= int8 and "lm_head" in int8
    assert not any("router" in n or "embed" in n or "norm" in n for n in int8)
    with pytest.raises(ValueError, match="int3"):
        l4jax.quantize(params, CONFIG, "int3")


# ---- grouped matmuls with a quantized operand ---------------------------------------------------


@pytest.mark.parametrize("mode", ["int4", "int8", "fp8"])
def test_grouped_matmuls_take_quantized_rhs(mode):
    rng = np.random.default_rng(3)
    lhs = jnp.asarray(rng.standard_normal((40, 256)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 256, 136)) * 0.05, jnp.float32)
    w2 = jnp.asarray(rng.standard_normal((4, 256, 136)) * 0.05, jnp.float32)
    group_sizes = jnp.asarray([9, 0, 20, 7], jnp.int32)  # an empty group, 4 rows past the end

    def quant(a):
        if mode == "int4":
            return quantize_int4(a)
        return (quantize_int8 if mode == "int8" else quantize_fp8)(a, (1,))

    qw, qw2 = quant(w), quant(w2)
    dense = jax.lax.ragged_dot(lhs, qw.astype(jnp.float32), group_sizes)
    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chunked_gmm(lhs, qw, group_sizes), dense, **tol)
    np.testing.assert_allclose(quantized_ragged_dot(lhs, qw, group_sizes), dense, **tol)
    np.testing.assert_allclose(qgmm(lhs, qw, group_sizes, tiling=(16, 128, 128)), dense, **tol)
    assert not np.asarray(dense[36:]).any()
    swiglu = jax.nn.silu(dense) * jax.lax.ragged_dot(lhs, qw2.astype(jnp.float32), group_sizes)
    got = qgmm_swiglu(lhs, qw, qw2, group_sizes, tiling=(16, 128, 128))
    np.testing.assert_allclose(got, swiglu, **tol)


def test_moe_backends_agree_on_int4_model(params):
    q = l4jax.quantize(params, CONFIG, "int4")
    want = Llama4ForCausalLM(CONFIG).apply({"params": q}, TOKENS)  # ragged_dot (chunked_gmm)
    for impl in ("gather", "dense", "pallas"):
        got = Llama4ForCausalLM(CONFIG.replace(moe_impl=impl)).apply({"params": q}, TOKENS)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=impl)


# ---- coverage on the real configs (abstract trees) ----------------------------------------------


@pytest.mark.parametrize("name", ["scout", "maverick"])
def test_int4_coverage_on_real_configs(name):
    config = preset(name, param_dtype="bfloat16")
    model = Llama4ForCausalLM(config)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    abstract = nn.unbox(abstract["params"])
    quantized = jax.eval_shape(lambda p: l4jax.quantize(p, config, "int4"), abstract)
    leaves = quantized_leaves(quantized)
    count = sum(int(np.prod(q.shape)) for _, q in leaves)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    assert count / total >= 0.94, (name, count / total)
    assert nbytes(quantized) <= 0.32 * nbytes(abstract), nbytes(quantized) / nbytes(abstract)
    # every routed-expert weight of every MoE layer is quantized (no silent skip)
    flat = jax.tree_util.tree_flatten_with_path(quantized, is_leaf=lambda x: isinstance(x, QArray))[
        0
    ]
    routed = 0
    for path, leaf in flat:
        keys = [str(getattr(p, "key", p)) for p in path]
        if keys[0] != "layers" or len(keys) != 4 or keys[2] != "feed_forward":
            continue
        if keys[3] in EXPERT_NAMES and config.layer_kinds[int(keys[1][6:])].is_moe:
            assert isinstance(leaf, QArray) and leaf.qvalue.dtype == jnp.uint8, keys
            routed += 1
    moe_slots = sum(k.is_moe for k in config.layer_kinds[: config.scan_period])
    assert routed == 3 * moe_slots > 0


# ---- expert parallelism -------------------------------------------------------------------------


@pytest.mark.parametrize("mesh_spec", ["data=4,expert=2", "data=2,expert=4"])
def test_expert_parallel_int4_forward_matches_single_device(params, mesh_spec):
    from l4jax.expert_parallel import ExpertParallel, current_dispatch
    from sharding import logical_rules, make_mesh, param_shardings

    config = CONFIG.replace(num_local_experts=8)
    q = l4jax.quantize(params, config, "int4")
    want = Llama4ForCausalLM(config).apply({"params": q}, TOKENS)
    mesh = make_mesh(mesh_spec)
    specs = logical_axes(param_logical_axes(config), q)
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules()):
        assert isinstance(current_dispatch(), ExpertParallel)
        q_sharded = jax.device_put(q, param_shardings(specs, mesh))
        routed = q_sharded["layers"]["layer_1"]["feed_forward"]["gate_proj"]
        # scales shard with their values (the one K group of this tiny model: unsplit)
        assert routed.qvalue.sharding.spec[1] == routed.scale.sharding.spec[1] == "expert"
        assert routed.scale.sharding.spec[3] == routed.qvalue.sharding.spec[3]
        got = jax.jit(Llama4ForCausalLM(config).apply)({"params": q_sharded}, TOKENS)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


# ---- loading ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    from hf_reference import SCOUT_LIKE, build_hf_model

    path = tmp_path_factory.mktemp("hf") / "scout-like"
    build_hf_model(dict(SCOUT_LIKE, num_hidden_layers=4), seed=0).save_pretrained(path)
    return path


@pytest.mark.parametrize("mode", ["int4", "fp8"])
def test_from_pretrained_quantizes_layer_by_layer(hf_checkpoint, mode):
    model, params = l4jax.from_pretrained(hf_checkpoint, dtype="float32")
    _, streamed = l4jax.from_pretrained(hf_checkpoint, dtype="float32", quantize=mode)
    want = l4jax.quantize(params, model.config, mode)
    flat = jax.tree_util.tree_flatten_with_path(streamed, is_leaf=_is_q)
    assert [p for p, _ in flat[0]] == [
        p for p, _ in jax.tree_util.tree_flatten_with_path(want, is_leaf=_is_q)[0]
    ]
    for got, ref in zip(jax.tree.leaves(streamed), jax.tree.leaves(want), strict=True):
        assert got.dtype == ref.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))
    assert len(quantized_leaves(streamed)) == len(quantized_leaves(want)) > 0


def test_from_pretrained_rejects_unknown_mode(hf_checkpoint):
    with pytest.raises(l4jax.errors.ConfigError, match="quantize='nf4': choose one of int8"):
        l4jax.from_pretrained(hf_checkpoint, quantize="nf4")


def _is_q(x):
    return isinstance(x, QArray)


# ---- entry points -------------------------------------------------------------------------------


@pytest.mark.slow  # the tiny preset with Llama 4's 202048-token vocabulary: ~30 s
def test_generate_cli_quantize(capsys, caplog):
    from l4jax.cli import main

    caplog.set_level("INFO")
    args = ["generate", "--preset", "tiny", "--prompt", "Hi", "--max-new-tokens", "3"]
    assert main([*args, "--temperature", "0", "--quantize", "int4"]) == 0
    assert capsys.readouterr().out.strip()
    assert "quantized to int4" in caplog.text
