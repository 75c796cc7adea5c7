"""Expert parallelism on 8 simulated CPU devices: the shard_map dispatch equals one device.

MoE-layer checks compare forward outputs and gradients (inputs, router, experts, shared expert)
on expert-parallel meshes against the same layer without a mesh; the whole-model checks load a
random HF checkpoint, shard its params over the mesh and compare logits with transformers.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import MAVERICK_LIKE, SCOUT_LIKE, build_hf_model, hf_logits, rel_err

import l4jax
from l4jax import expert_parallel, moe, preset
from l4jax.errors import ConfigError
from l4jax.expert_parallel import DEFAULT_RULES, ExpertParallel
from l4jax.model import MoE, param_logical_axes
from sharding import logical_rules, make_mesh, param_shardings
from sharding.rules import named

# 8 experts, top-2, F = 48 so that tensor=2 splits it
CONFIG = preset("tiny", num_experts_per_tok=2, hidden_size=32, intermediate_size=48)
X_BTD = jnp.asarray(np.random.default_rng(0).standard_normal((8, 12, 32)), jnp.float32)


@pytest.fixture(scope="module")
def layer():
    module = MoE(CONFIG)
    boxed = jax.jit(module.init)(jax.random.key(1), X_BTD)["params"]
    return module, nn.unbox(boxed), nn.get_partition_spec(boxed)


@pytest.fixture(scope="module")
def single_device(layer):
    module, params, _ = layer
    return _loss_and_grads(module, params, X_BTD)


def _loss_and_grads(module, params, x_btd):
    def loss(params, x):
        out, state = module.apply({"params": params}, x, mutable=["intermediates"])
        return jnp.sum(jnp.sin(out)), (out, state["intermediates"]["tokens_per_expert"][0])

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x_btd)


def _sharded(mesh_spec, layer, x_btd, config=CONFIG):
    module, params, specs = layer
    module = MoE(config)
    mesh = make_mesh(mesh_spec)
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules()):
        assert isinstance(expert_parallel.current_dispatch(), ExpertParallel)
        params = jax.device_put(params, param_shardings(specs, mesh))
        x_btd = jax.device_put(x_btd, named(mesh, ("activation_batch", None, None)))
        return _loss_and_grads(module, params, x_btd)


def _assert_same(got, want):
    (loss, (out, counts)), grads = got
    (ref_loss, (ref_out, ref_counts)), ref_grads = want
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(counts, ref_counts)  # router statistics survive sharding
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    flat, ref_flat = jax.tree.leaves_with_path(grads), jax.tree.leaves(ref_grads)
    assert len(flat) == len(ref_flat)
    for (path, g), r in zip(flat, ref_flat, strict=True):
        scale = float(np.max(np.abs(r)))
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-5 * scale, err_msg=str(path))


@pytest.mark.parametrize(
    "mesh_spec", ["data=2,expert=4", "data=2,expert=2,tensor=2", "fsdp=2,expert=2,sequence=2"]
)
def test_expert_parallel_moe_matches_single_device(layer, single_device, mesh_spec):
    assert int(single_device[0][1][1].sum()) == X_BTD.shape[0] * X_BTD.shape[1] * 2
    _assert_same(_sharded(mesh_spec, layer, X_BTD), single_device)


def test_expert_parallel_pallas_backend(layer):
    """The Pallas kernels (interpret mode) run per device inside the shard_map; the reference
    is the single-device `ragged_dot` backend."""
    module, params, _ = layer
    x_btd = X_BTD[:, :4]
    want = _loss_and_grads(module, params, x_btd)
    _assert_same(_sharded("data=2,expert=4", layer, x_btd, CONFIG.replace(moe_impl="pallas")), want)


def test_token_count_not_divisible_by_the_mesh_is_padded(layer):
    """Three tokens on 8 devices: the dispatch pads the tokens, cuts them off again, and the
    router statistics count only the real ones."""
    module, params, specs = layer
    x = X_BTD[:1, :3]
    (_, (ref_out, ref_counts)), _ = _loss_and_grads(module, params, x)
    mesh = make_mesh("expert=8")
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules()):
        params = jax.device_put(params, param_shardings(specs, mesh))
        apply = jax.jit(lambda p, x: module.apply(p, x, mutable=["intermediates"]))
        out, state = apply({"params": params}, x)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    counts = state["intermediates"]["tokens_per_expert"][0]
    np.testing.assert_array_equal(counts, ref_counts)
    assert int(counts.sum()) == 3 * CONFIG.num_experts_per_tok


def test_dispatch_is_shard_map_with_all_gather_and_reduce_scatter(layer):
    module, params, specs = layer
    mesh = make_mesh("data=2,expert=4")
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules()):
        params = jax.device_put(params, param_shardings(specs, mesh))
        hlo = jax.jit(module.apply).lower({"params": params}, X_BTD).compile().as_text()
    assert "reduce-scatter" in hlo
    assert "all-gather" in hlo
    # no device ever holds all experts: the expert weights stay [E / 4, ...] per device
    assert f"f32[{CONFIG.num_local_experts},32,48]" not in hlo


def test_experts_must_split_evenly():
    module = MoE(CONFIG.replace(num_local_experts=4, num_experts_per_tok=1))
    with jax.set_mesh(make_mesh("expert=8")), pytest.raises(ConfigError, match="4 experts do"):
        jax.eval_shape(module.init, jax.random.key(0), X_BTD)


def test_default_rules_are_the_sharding_rules_for_the_moe_axes():
    """Without active logical-axis rules the dispatch gives the mesh axes the roles that
    `sharding.rules.logical_rules()` gives them (for the axes it reads)."""
    mesh = make_mesh("data=2,expert=2,tensor=2")
    assert ExpertParallel.from_rules(mesh) == ExpertParallel.from_rules(mesh, logical_rules())
    mesh = make_mesh("fsdp=2,expert=2,sequence=2")
    assert ExpertParallel.from_rules(mesh) == ExpertParallel.from_rules(mesh, logical_rules())
    for name, _ in DEFAULT_RULES:
        assert nn.logical_to_mesh_axes((name,), DEFAULT_RULES) == nn.logical_to_mesh_axes(
            (name,), logical_rules()
        ), name


def test_no_mesh_means_single_device_dispatch():
    assert expert_parallel.current_dispatch() is moe.local_dispatch
    with jax.set_mesh(make_mesh("fsdp=1", devices=jax.devices()[:1])):
        assert expert_parallel.current_dispatch() is moe.local_dispatch


# ---- whole model, sharded, against transformers ------------------------------------------------

MODEL_CASES = {
    "scout_like": (SCOUT_LIKE, "data=2,expert=2,tensor=2"),
    "maverick_like": (MAVERICK_LIKE, "data=2,expert=4"),
}
TOKENS = np.random.default_rng(0).integers(0, 256, (8, 40))


@pytest.mark.parametrize("name", sorted(MODEL_CASES))
def test_sharded_model_matches_transformers(name, tmp_path):
    hf_config, mesh_spec = MODEL_CASES[name]
    hf_model = build_hf_model(hf_config, seed=1)
    hf_model.save_pretrained(tmp_path)
    ref = hf_logits(hf_model, TOKENS)
    model, params = l4jax.from_pretrained(tmp_path)
    mesh = make_mesh(mesh_spec)
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules()):
        shardings = param_shardings(param_logical_axes(model.config), mesh)
        params = jax.device_put(params, shardings)
        experts = params["layers"]["layer_1"]["feed_forward"]["gate_proj"]
        assert experts.sharding.spec[1] == "expert"  # [groups, E, D, F]: experts are split
        tokens = jax.device_put(jnp.asarray(TOKENS), named(mesh, ("activation_batch", None)))
        apply = jax.jit(model.apply)
        assert "shard_map" in str(jax.make_jaxpr(apply)({"params": params}, tokens))
        logits = np.asarray(apply({"params": params}, tokens))
    assert rel_err(logits, ref) < 1e-4


def test_dispatch_choice_is_part_of_the_jit_cache_key():
    """A function traced without a mesh is traced again under one (and picks the EP dispatch)."""
    seen = []

    @jax.jit
    def f(x):
        seen.append(type(expert_parallel.current_dispatch()))
        return x + 1

    f(jnp.ones(8))
    with jax.set_mesh(make_mesh("expert=8")):
        f(jnp.ones(8))
    assert seen[0] is not ExpertParallel and seen[1] is ExpertParallel
