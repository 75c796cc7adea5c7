"""Quantized l4jax checkpoints: `l4jax convert SRC DST --quantize MODE` and back.

The checkpoint holds exactly the leaves `from_pretrained(SRC, quantize=MODE)` makes (so the
same logits), loads without requantizing, restores with plain Orbax onto a mesh with each
scale sharded like its weight, and exports to Hugging Face only with `--dequantize`.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import l4jax
from l4jax.cli import main
from l4jax.convert import convert_checkpoint
from l4jax.model import param_logical_axes
from l4jax.quantization import QArray, logical_axes, quantized_leaves

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 8)), jnp.int32)


def _is_q(x):
    return isinstance(x, QArray)


def _flat(params):
    return jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_q)[0]


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    from hf_reference import SCOUT_LIKE, build_hf_model

    path = tmp_path_factory.mktemp("hf") / "scout-like"
    build_hf_model(dict(SCOUT_LIKE, num_hidden_layers=2), seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def int4_checkpoint(hf_checkpoint, tmp_path_factory):
    dst = tmp_path_factory.mktemp("q") / "int4"
    convert_checkpoint(hf_checkpoint, dst, quantize="int4", progress=False)
    return dst


@pytest.mark.parametrize("mode", ["int4", "int8", "fp8"])
def test_quantized_checkpoint_holds_the_quantized_leaves(hf_checkpoint, tmp_path, mode):
    dst = tmp_path / mode
    result = convert_checkpoint(hf_checkpoint, dst, quantize=mode, progress=False)
    assert result.dtype == f"float32, {mode}"
    assert json.loads((dst / "config.json").read_text())["quantization_config"] == {
        "quant_method": "l4jax",
        "mode": mode,
    }
    _, stored = l4jax.from_pretrained(dst)
    _, want = l4jax.from_pretrained(hf_checkpoint, quantize=mode)
    assert [p for p, _ in _flat(stored)] == [p for p, _ in _flat(want)]
    for (path, got), (_, ref) in zip(_flat(stored), _flat(want), strict=True):
        assert type(got) is type(ref), path
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape, path
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert {q.mode for _, q in quantized_leaves(stored)} == {mode}
    # loading as stored, or asking for the stored mode, never requantizes; another mode is refused
    assert l4jax.from_pretrained(dst, quantize=mode)[1].keys() == stored.keys()
    other = "int8" if mode != "int8" else "int4"
    with pytest.raises(l4jax.errors.ConfigError, match=f"quantize='{other}'.*quantized in {mode}"):
        l4jax.from_pretrained(dst, quantize=other)


def test_quantized_checkpoint_logits_equal_quantizing_on_load(hf_checkpoint, int4_checkpoint):
    # (the dense MoE backend compiles fastest; the backends agree, tests/test_quantization.py)
    model, stored = l4jax.from_pretrained(int4_checkpoint, moe_impl="dense")
    _, want = l4jax.from_pretrained(hf_checkpoint, quantize="int4")
    apply = jax.jit(model.apply)  # (one compile: both trees have the same structure)
    np.testing.assert_array_equal(
        apply({"params": stored}, TOKENS), apply({"params": want}, TOKENS)
    )


def test_quantized_checkpoint_restores_on_a_mesh_with_plain_orbax(int4_checkpoint):
    import orbax.checkpoint as ocp

    from sharding import logical_rules, make_mesh, param_shardings

    model, want = l4jax.from_pretrained(int4_checkpoint)
    config = model.config
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), want)
    mesh = make_mesh("data=2,expert=4")
    specs = logical_axes(param_logical_axes(config), abstract)
    with nn.logical_axis_rules(logical_rules()):
        shardings = param_shardings(specs, mesh)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )
    restored = ocp.StandardCheckpointer().restore(int4_checkpoint / "params", target)
    gate = restored["layers"]["layer_0"]["feed_forward"]["gate_proj"]
    assert isinstance(gate, QArray) and gate.qvalue.dtype == jnp.uint8
    assert len(gate.qvalue.sharding.device_set) == 8
    # the scale is split over the experts exactly as its values
    assert gate.scale.sharding.spec[1] == gate.qvalue.sharding.spec[1] == "expert"
    assert gate.qvalue.addressable_shards[0].data.shape[1] == config.num_local_experts // 4
    assert gate.scale.addressable_shards[0].data.shape[1] == config.num_local_experts // 4
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # l4jax's own restore takes the weights' shardings and shards the scales with them
    from l4jax.convert import restore_params

    plain = param_shardings(param_logical_axes(config), mesh)
    with nn.logical_axis_rules(logical_rules()):
        _, params = restore_params(int4_checkpoint, plain)
    ours = params["layers"]["layer_0"]["feed_forward"]["gate_proj"]
    assert ours.scale.sharding.spec[1] == ours.qvalue.sharding.spec[1] == "expert"


def test_quantized_checkpoint_exports_to_hf_only_with_dequantize(int4_checkpoint, tmp_path, capsys):
    dst = tmp_path / "hf"
    assert main(["convert", str(int4_checkpoint), str(dst), "--to", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(int4_checkpoint) in err and "--dequantize" in err
    assert not dst.exists() and not list(tmp_path.iterdir())
    assert main(["convert", str(int4_checkpoint), str(dst), "--to", "hf", "--dequantize"]) == 0
    _, exported = l4jax.from_pretrained(dst)
    _, stored = l4jax.from_pretrained(int4_checkpoint)
    dequantized = jax.tree.map(lambda x: x.astype(jnp.float32), stored, is_leaf=_is_q)
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(dequantized), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_convert_quantize_refuses_what_it_cannot_write(hf_checkpoint, int4_checkpoint, tmp_path):
    with pytest.raises(l4jax.errors.ConfigError, match="writes an l4jax checkpoint"):
        convert_checkpoint(hf_checkpoint, tmp_path / "a", to="hf", quantize="int4")
    with pytest.raises(l4jax.errors.ConfigError, match="already int4-quantized"):
        convert_checkpoint(int4_checkpoint, tmp_path / "b", quantize="int8", dequantize=True)
    assert not list(tmp_path.iterdir())
