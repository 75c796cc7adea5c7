"""Model structure: MoE backends agree, packing isolates segments, scan, remat, logical axes."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l4jax import Llama4ForCausalLM, init_params, preset
from l4jax.model import param_logical_axes

# 2 layers (a chunked RoPE layer with a dense FFN, a NoPE layer with MoE): every layer kind
# the tests need, half the compile of tiny's 4
TINY = preset("tiny", num_experts_per_tok=2, num_hidden_layers=2, no_rope_layer_interval=2)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 70)), jnp.int32)


@pytest.fixture(scope="module")
def params():
    return init_params(TINY, rng=1)


def _loss(config, params, tokens=TOKENS):
    logits = Llama4ForCausalLM(config).apply({"params": params}, tokens)
    return jnp.mean(
        jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]
    )


# the Pallas kernels run in interpret mode on CPU (~1 minute each): slow; ragged_dot stays
@pytest.mark.parametrize(
    "impl",
    [
        "ragged_dot",
        pytest.param("pallas", marks=pytest.mark.slow),
        pytest.param("megablox", marks=pytest.mark.slow),
    ],
)
def test_sorted_dispatch_matches_dense_oracle_forward_and_gradient(params, impl):
    # Pallas interpret mode is slow: fewer tokens for the kernels
    tokens = {"ragged_dot": TOKENS, "pallas": TOKENS[:, :40]}.get(impl, TOKENS[:, :16])
    dense = jax.value_and_grad(_loss, argnums=1)(TINY.replace(moe_impl="dense"), params, tokens)
    got = jax.value_and_grad(_loss, argnums=1)(TINY.replace(moe_impl=impl), params, tokens)
    np.testing.assert_allclose(got[0], dense[0], rtol=1e-5)
    for g, d in zip(jax.tree.leaves(got[1]), jax.tree.leaves(dense[1])):
        np.testing.assert_allclose(g, d, rtol=1e-4, atol=1e-6)


def test_router_load_is_reported(params):
    _, state = Llama4ForCausalLM(TINY).apply({"params": params}, TOKENS, mutable=["intermediates"])
    loads = jax.tree.leaves(state["intermediates"])
    assert len(loads) == len(TINY.moe_layers)  # one [groups, E] array per MoE slot
    for load in loads:
        assert load.shape[-1] == TINY.num_local_experts
        assert int(load.sum()) == TOKENS.size * TINY.num_experts_per_tok


def test_packed_segments_do_not_attend_across(params):
    """Doc A's logits are the same alone, packed before doc B, and with doc B changed."""
    rng = np.random.default_rng(3)
    doc_a, doc_b = rng.integers(0, 512, 40), rng.integers(0, 512, 30)
    model = Llama4ForCausalLM(TINY)

    def packed(b):
        tokens = jnp.asarray(np.concatenate([doc_a, b])[None], jnp.int32)
        positions = jnp.asarray(np.concatenate([np.arange(40), np.arange(30)])[None])
        segments = jnp.asarray(np.array([1] * 40 + [2] * 30)[None])
        return model.apply({"params": params}, tokens, positions, segments)

    alone = model.apply({"params": params}, jnp.asarray(doc_a[None], jnp.int32))
    first, second = packed(doc_b), packed(rng.integers(0, 512, 30))
    np.testing.assert_allclose(first[0, :40], alone[0], atol=1e-5)
    np.testing.assert_allclose(second[0, :40], first[0, :40], atol=1e-6)
    assert not np.allclose(second[0, 40:], first[0, 40:])


COMPILE_SECONDS = """
import time
import jax, jax.numpy as jnp
from l4jax import Llama4ForCausalLM, init_params, preset
def seconds(num_layers):
    config = preset("tiny", num_hidden_layers=num_layers)
    abstract = jax.eval_shape(lambda: init_params(config))
    tokens = jnp.zeros((2, 70), jnp.int32)
    start = time.process_time()  # (CPU seconds of this process: blind to other test workers)
    jax.jit(Llama4ForCausalLM(config).apply).lower({"params": abstract}, tokens).compile()
    return time.process_time() - start
seconds(4)  # warm up tracing caches shared by both
print(seconds(4), seconds(16))
"""


@pytest.mark.slow  # three compiles of 4/4/16 layers in a child
def test_compile_time_does_not_grow_with_depth():
    # In a child without the persistent compilation cache (conftest shares one across the
    # run): a cache hit for the second 4-layer compile would make the shallow time ~0.
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
    out = subprocess.run([sys.executable, "-c", COMPILE_SECONDS], env=env, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    shallow, deep = map(float, out.split())
    assert deep < 2 * shallow, (shallow, deep)


@pytest.mark.parametrize("policy", ["full", pytest.param("dots", marks=pytest.mark.slow)])
def test_gradients_flow_through_remat(params, policy):
    plain = jax.grad(_loss, argnums=1)(TINY, params)
    remat = jax.grad(_loss, argnums=1)(TINY.replace(remat_policy=policy), params)
    for g, r in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(r, g, rtol=1e-5, atol=1e-7)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(remat))


def test_every_param_has_logical_axes(params):
    axes = param_logical_axes(TINY)
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat_params = jax.tree.leaves(params)
    assert len(flat_axes) == len(flat_params)
    for spec, p in zip(flat_axes, flat_params):
        assert len(spec) == p.ndim and all(isinstance(n, str) for n in spec), spec
    layer_specs = jax.tree.leaves(
        axes["layers"], is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    assert all(spec[0] == "layers" for spec in layer_specs)
    assert axes["layers"]["layer_1"]["feed_forward"]["gate_proj"] == jax.sharding.PartitionSpec(
        "layers", "expert", "embed", "mlp"
    )


def test_compute_and_param_dtypes_are_separate(params):
    config = TINY.replace(dtype="bfloat16", param_dtype="float32")
    bf16_params = init_params(config.replace(param_dtype="bfloat16"))
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(bf16_params))
    logits = Llama4ForCausalLM(config).apply({"params": params}, TOKENS)
    assert logits.dtype == jnp.float32
    ref = Llama4ForCausalLM(TINY).apply({"params": params}, TOKENS)
    assert float(jnp.sqrt(jnp.mean((logits - ref) ** 2) / jnp.mean(ref**2))) < 0.05
