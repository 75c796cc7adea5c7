"""Token cross-entropy from the final hidden states, in sequence blocks.

    ce_sum = cross_entropy_sum(hidden_btd, head_dv, targets_bt, weights_bt)

Computing the logits of every position at once holds [B, T, V] fp32 (Scout's V = 202,048: 26 GB
for one 32k-token row), plus as much again for their gradient. Here the sequence is split into
blocks whose fp32 logits fit `LOGITS_BLOCK_BYTES`; a `lax.scan` runs them, and each block is
rematerialised in the backward pass, so at most one block of logits (and its gradient) exists at
a time. Per token the math is today's: logits = h @ W in fp32 (`preferred_element_type`),
logsumexp minus the target's logit, times the token's weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

LOGITS_BLOCK_BYTES = 256 * 2**20  # fp32 logits of one block, all rows


def _token_losses(x_btd: Array, head_dv: Array, targets_bt: Array, weights_bt: Array) -> Array:
    logits = jnp.einsum(
        "btd,dv->btv", x_btd, head_dv.astype(x_btd.dtype), preferred_element_type=jnp.float32
    )
    logz_bt = jax.nn.logsumexp(logits, axis=-1)
    target_bt = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
    return jnp.sum((logz_bt - target_bt) * weights_bt)


def block_length(batch: int, seq_len: int, vocab: int, budget: int = LOGITS_BLOCK_BYTES) -> int:
    """Tokens per row in one block: the most whose fp32 logits [B, block, V] fit `budget`."""
    return max(1, min(seq_len, budget // (4 * batch * vocab)))


def cross_entropy_sum(
    hidden_btd: Array,
    head_dv: Array,
    targets_bt: Array,
    weights_bt: Array,
    block: int | None = None,
) -> Array:
    """sum over tokens of weight * (logsumexp(logits) - logits[target]), fp32 scalar.

    `block`: tokens per row in one block (default `block_length`). Blocks run along the
    sequence with every row in each, so data-parallel rows stay on their devices."""
    b, t, _ = hidden_btd.shape
    block = block or block_length(b, t, head_dv.shape[1])
    if block >= t:
        return _token_losses(hidden_btd, head_dv, targets_bt, weights_bt)
    n = -(-t // block)
    pad = n * block - t

    def blocks(x, value=0):  # [B, T, ...] -> [n, B, block, ...], padded tokens weigh 0
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
        return x.reshape(b, n, block, *x.shape[2:]).swapaxes(0, 1)

    one_block = jax.checkpoint(lambda x, y, w: _token_losses(x, head_dv, y, w))

    def step(total, xs):
        return total + one_block(*xs), None

    xs = (blocks(hidden_btd), blocks(targets_bt), blocks(weights_bt.astype(jnp.float32)))
    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), xs)
    return total
