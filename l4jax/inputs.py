"""Checks of user input at the entry points that take it, each a one-line `InputError`.

Token ids and sequence lengths are checked where they enter: `l4jax.generate` (prompt ids, and
prompt + new tokens against `max_position_embeddings`), the training data pipeline (every
tokenized document, `pipelines.packing.Tokenize`; the tokenizer and `--seq-len` before the step
compiles), and the CLIs through both. `model.apply` itself checks nothing, as a jitted function
cannot: an id outside [0, vocab_size) gathers a NaN embedding row (`jnp.take`'s fill mode), and
every logit of that sequence is NaN (earlier positions too: a masked attention weight 0 times
NaN is NaN); positions past `max_position_embeddings` are computed
without complaint (RoPE extrapolates) but were never trained.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from l4jax.errors import InputError


def check_token_ids(ids: Any, vocab_size: int, what: str) -> None:
    """Every id of `ids` (any shape) in [0, vocab_size), else InputError naming `what`."""
    ids = np.asarray(ids)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{what}: token ids must be integers, got dtype {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise InputError(
            f"{what}: token id {int(bad.flat[0])} outside the model's vocabulary [0, {vocab_size})"
        )


def check_positions(length: int, max_positions: int, what: str) -> None:
    """A sequence of `length` tokens fits the model's `max_position_embeddings`."""
    if length > max_positions:
        raise InputError(
            f"{what}: {length} tokens, more than the model's max_position_embeddings "
            f"{max_positions}"
        )


def check_tokenizer(tokenizer: Any, vocab_size: int) -> None:
    """The tokenizer's ids all exist in the model's vocabulary."""
    if tokenizer.vocab_size > vocab_size:
        raise InputError(
            f"tokenizer {tokenizer!r} has {tokenizer.vocab_size} ids but the model's vocab_size "
            f"is {vocab_size}"
        )
