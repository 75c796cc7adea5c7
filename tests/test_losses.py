"""Blockwise cross-entropy (l4jax.losses) against the full-logits loss."""

import jax
import jax.numpy as jnp
import numpy as np

from l4jax.losses import block_length, cross_entropy_sum


def test_blockwise_cross_entropy_equals_full_logits_loss_and_gradients():
    rng = np.random.default_rng(0)
    b, t, d, v = 2, 37, 16, 300
    x = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((d, v)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, (b, t)), jnp.float32)

    def full(x, head):
        logits = jnp.einsum("btd,dv->btv", x, head)
        logz = jax.nn.logsumexp(logits, -1)
        tgt = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        return jnp.sum((logz - tgt) * weights)

    ref, ref_g = jax.value_and_grad(full, (0, 1))(x, head)
    for block in (None, 5, 8):  # None: one block
        got, got_g = jax.value_and_grad(cross_entropy_sum, (0, 1))(x, head, targets, weights, block)
        np.testing.assert_allclose(got, ref, rtol=1e-6)
        for g, r in zip(got_g, ref_g):
            np.testing.assert_allclose(g, r, atol=1e-5)
    # Scout's vocabulary: 32k tokens per row run in blocks of 332 tokens (256 MiB of logits)
    assert block_length(1, 32768, 202048) == 332
