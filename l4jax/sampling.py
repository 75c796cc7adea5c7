"""Next-token sampling: greedy, temperature, top-k, top-p (in that order, as Hugging Face)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax); else temperature, then top-k, then top-p (as HF)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be a positive int or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] or be None, got {self.top_p}")


def sample(logits_bv: Array, key: Array, sampling: Sampling) -> Array:
    """Next ids [B] from fp32 logits [B, V]; row b draws from fold_in(key, b).

    Per-row keys make a row's draw independent of the other rows' logits.
    """
    if sampling.temperature == 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv.astype(jnp.float32) / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p is not None and sampling.top_p < 1:
        logits = _top_p_filter(logits, sampling.top_p)
    keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(logits.shape[0]))
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def _top_p_filter(logits_bv: Array, top_p: float) -> Array:
    """Keep the smallest set of top tokens whose probability reaches top_p (at least one)."""
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_bv, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better tokens
    keep = mass_above < top_p
    threshold = jnp.min(jnp.where(keep, sorted_bv, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_bv < threshold, -jnp.inf, logits_bv)
