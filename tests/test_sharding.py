"""Sharded training on 8 simulated devices: every strategy matches the unsharded step, and every
parameter (and optimizer buffer) is sharded exactly as its logical-axis rule says."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l4jax import preset
from l4jax.errors import ConfigError
from l4jax.model import param_logical_axes
from l4jax.train_config import OptimizerConfig, TrainConfig
from l4jax.train_step import Trainer
from l4jax.vision import Llama4ForConditionalGeneration
from l4jax.vision import init_params as init_multimodal
from l4jax.vision import param_logical_axes as multimodal_logical_axes
from l4jax.vision_config import Llama4MultimodalConfig, vision_preset
from sharding import make_mesh, parse_mesh_spec
from sharding.rules import batch_sharding, mesh_context, shard_params, spec_for

# two layers (one dense, one MoE) keep the compiles short; every parameter kind is present.
# Chunks of 16 with one NoPE layer: a 32-token row crosses a chunk boundary, and on the
# `sequence=2` mesh each shard is one whole chunk (the chunked layer runs locally plus its halo)
# while the NoPE layer runs the ring.
CONFIG = preset(
    "tiny", num_experts_per_tok=2, num_hidden_layers=2, attention_chunk_size=16,
    no_rope_layer_interval=2,
)  # fmt: skip
# A large Adam eps keeps the first update a smooth function of the gradient (with eps ~ 0 it
# is sign(g) * lr, which turns fp32 reduction-order noise in near-zero gradients into lr-sized
# differences); the comparison then holds at fp32 tolerance.
TC = TrainConfig(
    batch_size=8, seq_len=32,
    optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=0, eps=1e-3),
)  # fmt: skip
MESHES = {  # strategy: (mesh, micro-batches)
    "fsdp": ("fsdp=8", 1),
    "fsdp+tp": ("fsdp=4,tensor=2", 1),
    "fsdp+ep": ("fsdp=2,expert=4", 1),
    "fsdp+sequence": ("fsdp=4,sequence=2", 1),  # the whole model and step, length split
    "data+ep+tp, 2 micro-batches": ("data=2,expert=2,tensor=2", 2),
}


def _batch(seed=0):
    """Two packed documents per row (lengths vary), with padding at the end of row 0."""
    rng = np.random.default_rng(seed)
    b, t = TC.batch_size, TC.seq_len
    tokens = rng.integers(0, CONFIG.vocab_size, (b, t))
    cut = rng.integers(4, t - 4, b)
    segments = np.where(np.arange(t)[None] < cut[:, None], 1, 2)
    positions = np.where(segments == 1, np.arange(t)[None], np.arange(t)[None] - cut[:, None])
    segments[0, -5:] = 0
    as_i32 = lambda x: jnp.asarray(x, jnp.int32)
    return {
        "tokens": as_i32(tokens),
        "segment_ids": as_i32(segments),
        "positions": as_i32(positions),
    }


def _one_step(mesh, params, tc=TC):
    trainer = Trainer(CONFIG, tc, mesh)
    state = trainer.state_from_params(params)
    new_state, metrics = trainer.step(state, jax.device_put(_batch(), trainer.batch_sharding))
    return trainer, new_state, metrics


@pytest.fixture(scope="module")
def reference():
    mesh = make_mesh("", devices=jax.devices()[:1])
    trainer = Trainer(CONFIG, TC, mesh)
    params = jax.device_get(trainer.init(seed=0).params)
    _, state, metrics = _one_step(mesh, params)
    return params, jax.device_get(state.params), jax.device_get(metrics)


def _ways(spec, mesh):
    """How many pieces each dimension of an array with PartitionSpec `spec` is split into."""
    names = [(a,) if isinstance(a, str) else tuple(a or ()) for a in spec]
    return [math.prod(mesh.shape[n] for n in axes) for axes in names]


def _assert_sharded_as_ruled(tree, mesh, logical_axes):
    for (path, leaf), axes in zip(
        jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(logical_axes)
    ):
        expected = spec_for(tuple(axes))
        assert leaf.sharding.spec == expected, (jax.tree_util.keystr(path), leaf.sharding.spec)
        shard = leaf.addressable_shards[0].data.shape
        for dim, ways in enumerate(_ways(expected, mesh)):
            assert shard[dim] * ways == leaf.shape[dim], (jax.tree_util.keystr(path), dim)


# fsdp+tp and fsdp+ep are each covered in the default suite by data+ep+tp: slow
@pytest.mark.parametrize(
    "strategy",
    [pytest.param(s, marks=pytest.mark.slow) if s in ("fsdp+tp", "fsdp+ep") else s for s in MESHES],
)
def test_sharded_step_matches_unsharded(reference, strategy):
    params, want_params, want = reference
    spec, micro = MESHES[strategy]
    mesh = make_mesh(spec)
    trainer, state, metrics = _one_step(mesh, params, dataclasses.replace(TC, grad_accum=micro))
    np.testing.assert_allclose(metrics["loss"], want["loss"], rtol=2e-6)
    np.testing.assert_allclose(metrics["grad_norm"], want["grad_norm"], rtol=1e-5)
    np.testing.assert_array_equal(metrics["router_load"], want["router_load"])
    for got, ref in zip(
        jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(want_params)
    ):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # params, Adam's mu and nu: sharded exactly as the rules say, nothing silently replicated
    logical = param_logical_axes(CONFIG)
    _assert_sharded_as_ruled(state.params, mesh, logical)
    adam = state.opt_state[1][0]
    _assert_sharded_as_ruled(adam.mu, mesh, logical)
    _assert_sharded_as_ruled(adam.nu, mesh, logical)
    # ... and the weights really are split, checked without the rules (a rule that replicated
    # the embedding would pass the check above): every large parameter is split, and under pure
    # FSDP a device holds 1/8 of each (about 1/8 of all parameter bytes, norms aside)
    leaves = jax.tree.leaves(state.params)
    big = [leaf for leaf in leaves if leaf.size >= 8192]  # embedding, projections, experts
    assert all(leaf.addressable_shards[0].data.nbytes < leaf.nbytes for leaf in big)
    if spec == "fsdp=8":
        assert all(leaf.addressable_shards[0].data.nbytes * 8 == leaf.nbytes for leaf in big)
        total = sum(leaf.nbytes for leaf in leaves)
        on_device_0 = sum(leaf.addressable_shards[0].data.nbytes for leaf in leaves)
        assert on_device_0 < 1.05 * total / 8, (on_device_0, total)


MULTIMODAL = Llama4MultimodalConfig(
    CONFIG, vision_preset("tiny"), image_token_index=CONFIG.vocab_size - 1
)


@pytest.fixture(scope="module")
def multimodal_reference():
    """Params, a batch of 8 token rows holding 3 tiles' <|patch|> tokens (a tile count that
    does not split over the mesh), the tiles, and the unsharded logits."""
    rng = np.random.default_rng(1)
    tiles = 3
    tokens = rng.integers(0, CONFIG.vocab_size - 1, (8, 16))
    slots = rng.choice(tokens.size, tiles * MULTIMODAL.vision.tokens_per_tile, replace=False)
    tokens.reshape(-1)[slots] = MULTIMODAL.image_token_index
    tokens = jnp.asarray(tokens, jnp.int32)
    pixels = jnp.asarray(rng.standard_normal((tiles, 3, 56, 56)), jnp.float32)
    params = init_multimodal(MULTIMODAL, 0)
    apply = jax.jit(Llama4ForConditionalGeneration(MULTIMODAL).apply)
    want = apply({"params": params}, tokens, pixel_values=pixels)
    return params, tokens, pixels, np.asarray(want)


@pytest.mark.parametrize(
    "mesh_spec", [pytest.param("fsdp=8", marks=pytest.mark.slow), "data=2,expert=2,tensor=2"]
)
def test_sharded_multimodal_forward_matches_unsharded(multimodal_reference, mesh_spec):
    params, tokens, pixels, want = multimodal_reference
    mesh = make_mesh(mesh_spec)
    logical = multimodal_logical_axes(MULTIMODAL)
    with mesh_context(mesh):
        sharded = shard_params(params, logical, mesh)
        apply = jax.jit(Llama4ForConditionalGeneration(MULTIMODAL).apply)
        tokens = jax.device_put(tokens, batch_sharding(mesh))
        got = apply({"params": sharded}, tokens, pixel_values=pixels)
    assert np.max(np.abs(got - want)) < 1e-5 * np.max(np.abs(want))
    _assert_sharded_as_ruled(sharded, mesh, logical)
    # the vision axes have rules: every vision weight but the LayerNorms is split, except that
    # the biases over heads / MLP hidden (on `tensor` alone, as in Megatron) need a tensor axis
    vision = {
        jax.tree_util.keystr(path, simple=True, separator="/"): spec_for(tuple(axes))
        for path, axes in jax.tree_util.tree_leaves_with_path(logical)
        if any(str(name).startswith("vision_") for name in axes)
    }
    assert len(vision) == 18
    whole = {name for name, spec in vision.items() if math.prod(_ways(spec, mesh)) == 1}
    tensor_only = {f"vision_model/layers/self_attn/{x}_bias" for x in "qkv"}
    tensor_only.add("vision_model/layers/fc1/bias")
    assert whole == (set() if mesh.shape["tensor"] > 1 else tensor_only)


def test_router_losses_are_optional_and_reported(reference):
    params, _, want = reference
    opt = dataclasses.replace(TC.optimizer, router_z_loss=1e-3, load_balance_loss=1e-2)
    tc = dataclasses.replace(TC, optimizer=opt)
    _, _, metrics = _one_step(make_mesh("", devices=jax.devices()[:1]), params, tc)
    np.testing.assert_allclose(metrics["loss"], want["loss"], rtol=2e-6)  # CE is unchanged
    assert float(metrics["router_z_loss"]) > 0
    assert 1.0 <= float(metrics["load_balance_loss"]) <= CONFIG.num_local_experts
    assert "router_z_loss" not in want


def test_mesh_spec_parsing():
    assert parse_mesh_spec("data=2,fsdp=2,expert=2", 8) == {
        "data": 2, "fsdp": 2, "expert": 2, "sequence": 1, "tensor": 1
    }  # fmt: skip
    assert parse_mesh_spec("", 8)["fsdp"] == 8
    assert parse_mesh_spec("tensor=2,fsdp=-1", 8)["fsdp"] == 4
    for bad in ("fsdp=3", "model=8", "fsdp=two", "fsdp=-1,data=-1"):
        with pytest.raises(ConfigError):
            parse_mesh_spec(bad, 8)


def test_batch_must_split_over_the_mesh():
    with pytest.raises(ConfigError, match="divisible by data x fsdp x expert = 8"):
        Trainer(CONFIG, dataclasses.replace(TC, batch_size=4), make_mesh("fsdp=8"))
