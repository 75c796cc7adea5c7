"""KV-cache text generation: jitted prefill, an on-device decode loop, sampling, stop handling.

    ids = l4jax.generate(model, params, [[1, 2, 3], [4, 5]], max_new_tokens=32)   # [B, T + N]

Batches of prompts with different lengths are LEFT-padded to a common length T. Every row keeps
its own absolute positions (0 at its first real token) for RoPE, chunk boundaries and the NoPE
temperature tuning, so a row generates exactly what it would generate alone (pad keys are masked
out). `transformers` agrees on RoPE positions and chunk boundaries (its chunked mask is shifted by
the left padding) but computes temperature tuning from the padded index; see docs/inference.md.

The cache is one `{"k", "v"}` pair of [G, B, S, K, H] arrays per scan slot (G layer groups, as
the params): NoPE/global layers keep every index (S = T + N - 1), chunked RoPE layers keep a ring
of S = min(attention_chunk_size, T + N - 1) slots, because a query never looks back past the
start of its chunk. Prefill runs the prompt in pieces of `prefill_chunk` tokens (default the
attention chunk size): the first piece (the remainder T % piece) attends within itself, every
later piece attends to the cache and itself (`l4jax.model.cached_attention`) and is stored, and
only the last position's logits are computed, so a long prompt needs the cache plus one piece's
activations. Then one
`jax.lax.while_loop` decodes (one token per row and iteration) until every row has stopped or
N tokens exist. Shapes are static: B batch, T padded prompt length, N max new tokens, V vocab.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback
from jax.sharding import PartitionSpec

from l4jax.config import PRESETS, Llama4Config, preset
from l4jax.convert import from_pretrained
from l4jax.convert.load import open_checkpoint, source_config
from l4jax.errors import ConfigError, ImageError
from l4jax.inputs import check_positions, check_token_ids
from l4jax.model import KV_CACHE_AXES, Llama4ForCausalLM, init_params
from l4jax.moe import resolve_impl
from l4jax.quantization import MODES, quantize_logged
from l4jax.tokenizer import Message, Tokenizer
from l4jax.vision import PIXEL_DTYPES, replace_image_embeddings

if TYPE_CHECKING:  # (l4jax.preprocess, with PIL, loads when images are used)
    from l4jax.preprocess import ChatImages

log = logging.getLogger(__name__)
Array = jax.Array
# <|end_of_text|>, <|eom|>, <|eot|>: the Llama 4 tokenizer's stop tokens
LLAMA4_STOP_IDS = (200001, 200007, 200008)


# ---- cache ---------------------------------------------------------------------------------


def cache_lengths(config: Llama4Config, max_len: int, chunk_aware: bool = True) -> tuple[int, ...]:
    """Slots S per scan slot: min(chunk, max_len) for chunked layers, max_len for the others."""
    kinds = config.layer_kinds[: config.scan_period]
    chunk = config.attention_chunk_size
    return tuple(min(chunk, max_len) if chunk_aware and kind.chunked else max_len for kind in kinds)


def _cache_shapes(
    config: Llama4Config, batch: int, max_len: int, chunk_aware: bool
) -> dict[str, tuple[int, ...]]:
    groups = config.num_hidden_layers // config.scan_period
    kv, h = config.num_key_value_heads, config.head_dim
    return {
        f"layer_{slot}": (groups, batch, s, kv, h)
        for slot, s in enumerate(cache_lengths(config, max_len, chunk_aware))
    }


def init_cache(
    config: Llama4Config,
    batch: int,
    max_len: int,
    *,
    chunk_aware: bool = True,
    dtype: Any = None,
) -> dict[str, dict[str, Array]]:
    """Zeros {"layer_{slot}": {"k", "v": [G, B, S, K, H]}} (dtype: the compute dtype)."""
    dtype = jnp.dtype(dtype or config.dtype)
    return {
        name: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
        for name, shape in _cache_shapes(config, batch, max_len, chunk_aware).items()
    }


def cache_logical_axes(config: Llama4Config) -> dict[str, dict[str, PartitionSpec]]:
    """Logical axis names of the cache (as `param_logical_axes`): `layers` + KV_CACHE_AXES."""
    spec = PartitionSpec("layers", *KV_CACHE_AXES)
    return {f"layer_{slot}": {"k": spec, "v": spec} for slot in range(config.scan_period)}


def cache_bytes(
    config: Llama4Config,
    max_len: int,
    *,
    batch: int = 1,
    dtype: Any = "bfloat16",
    chunk_aware: bool = True,
) -> int:
    """Bytes of the K and V cache for `batch` rows of `max_len` tokens (arithmetic, no arrays)."""
    itemsize = jnp.dtype(dtype).itemsize
    shapes = _cache_shapes(config, batch, max_len, chunk_aware)
    return 2 * itemsize * sum(int(np.prod(s)) for s in shapes.values())


def tree_bytes(tree: Any) -> int:
    """Bytes held by the arrays of a pytree (e.g. a cache from `init_cache`)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# ---- sampling ------------------------------------------------------------------------------


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


# ---- inputs --------------------------------------------------------------------------------


def default_stop_ids(config: Llama4Config) -> tuple[int, ...]:
    """<|end_of_text|>, <|eom|>, <|eot|> and the config's eos ids that exist in its vocab."""
    eos = config.eos_token_id
    eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    return tuple(sorted(i for i in {*LLAMA4_STOP_IDS, *eos} if 0 <= i < config.vocab_size))


def default_pad_id(config: Llama4Config) -> int:
    """`config.pad_token_id` (Llama 4: <|finetune_right_pad|>), else 0."""
    return config.pad_token_id if config.pad_token_id is not None else 0


def left_pad(
    prompts: Any, pad_id: int, vocab_size: int, pad_to_multiple_of: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (tokens [B, T] int32 left-padded with pad_id, lengths [B] int32).

    `prompts`: one sequence of ids, a [B, T] array (all rows length T) or a list of sequences.
    T is the longest prompt rounded up to a multiple of `pad_to_multiple_of`.
    """
    if isinstance(prompts, (np.ndarray, jax.Array)):
        arr = np.asarray(prompts)
        rows = [arr] if arr.ndim == 1 else list(arr)
    elif len(prompts) > 0 and np.ndim(prompts[0]) == 0:
        rows = [np.asarray(prompts)]
    else:
        rows = [np.asarray(p) for p in prompts]
    if not rows:
        raise ValueError("generate: no prompts given")
    for b, row in enumerate(rows):
        if row.ndim != 1 or row.size == 0:
            raise ValueError(f"generate: prompt {b} must be a non-empty 1-D id sequence")
        check_token_ids(row, vocab_size, f"generate: prompt {b}")
    lengths = np.array([len(r) for r in rows], np.int32)
    width = -(-int(lengths.max()) // pad_to_multiple_of) * pad_to_multiple_of
    tokens = np.full((len(rows), width), pad_id, np.int32)
    for b, row in enumerate(rows):
        tokens[b, tokens.shape[1] - len(row) :] = row
    return tokens, lengths


# ---- prefill and decode loop ---------------------------------------------------------------


class DecodeState(NamedTuple):
    tokens: Array  # [B, T + N] int32: left-padded prompts, new tokens, pad after a stop
    cache: dict[str, Any]  # {"layer_{slot}": {"k", "v": [G, B, S, K, H]}}
    step: Array  # [] int32: new tokens written so far
    done: Array  # [B] bool: the row has emitted a stop id
    logits: Array | None  # [B, N, V] float32 logits of every step, if requested


# Streaming: io_callback targets a fixed function that looks the consumer up by id, so a new
# consumer does not recompile the loop.
_SINKS: dict[int, Callable[[np.ndarray], None]] = {}
_SINK_IDS = itertools.count()
_SINK_LOCK = threading.Lock()


def _dispatch(sink_id: np.ndarray, tokens_b: np.ndarray) -> None:
    _SINKS[int(sink_id)](np.asarray(tokens_b))


@contextlib.contextmanager
def _sink(on_token: Callable[[np.ndarray], None] | None) -> Iterator[int]:
    if on_token is None:
        yield -1
        return
    with _SINK_LOCK:
        sink_id = next(_SINK_IDS)
        _SINKS[sink_id] = on_token
    try:
        yield sink_id
    finally:
        with _SINK_LOCK:
            del _SINKS[sink_id]


class _Loop(NamedTuple):
    """Everything static about one generation (hashable: a jit static argument)."""

    model: Llama4ForCausalLM  # prefill
    decode_model: Llama4ForCausalLM  # decode steps (same weights, maybe another MoE backend)
    max_new_tokens: int
    sampling: Sampling
    pad_id: int
    chunk_aware: bool
    return_logits: bool
    stream: bool
    prefill_chunk: int  # prompt tokens per prefill piece (0: the whole prompt at once)


def _emit(
    loop: _Loop, state: DecodeState, logits_bv: Array, key: Array, stop_ids: Array, sink_id: Array
) -> DecodeState:
    """Sample new token `state.step` of every row from logits [B, V] and record it."""
    step = state.step
    tok_b = sample(logits_bv, jax.random.fold_in(key, step), loop.sampling)
    tok_b = jnp.where(state.done, loop.pad_id, tok_b)
    prompt_len = state.tokens.shape[1] - loop.max_new_tokens
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, tok_b[:, None], prompt_len + step, 1)
    done = state.done | jnp.any(tok_b[:, None] == stop_ids[None, :], axis=-1)
    logits = state.logits
    if loop.return_logits:
        logits = jax.lax.dynamic_update_slice_in_dim(logits, logits_bv[:, None], step, 1)
    if loop.stream:
        io_callback(_dispatch, None, sink_id, tok_b, ordered=True)
    return DecodeState(tokens, state.cache, step + 1, done, logits)


@functools.partial(jax.jit, static_argnums=0)
def _prefill(
    loop: _Loop,
    params: Any,
    tokens_bt: Array,
    lengths_b: Array,
    key: Array,
    stop_ids: Array,
    sink_id: Array,
    image_embeds: Array | None = None,
    image_token_id: Array | None = None,
) -> DecodeState:
    config = loop.model.config
    b, t = tokens_bt.shape
    n = loop.max_new_tokens
    cache = init_cache(config, b, t + n - 1, chunk_aware=loop.chunk_aware)
    index_t = jnp.arange(t, dtype=jnp.int32)
    pad_b = t - lengths_b
    positions_bt = jnp.maximum(index_t[None, :] - pad_b[:, None], 0)
    segments_bt = (index_t[None, :] >= pad_b[:, None]).astype(jnp.int32)  # 0 = padding
    merge = None  # image embeddings replace the <|patch|> token embeddings (l4jax.vision)
    if image_embeds is not None:
        merge = functools.partial(
            replace_image_embeddings,
            tokens_bt=tokens_bt,
            image_embeds_md=image_embeds,
            image_token_id=image_token_id,
        )
    last_b1v, cache = _prefill_pieces(
        loop, params, tokens_bt, positions_bt, segments_bt, cache, merge
    )
    buffer = jnp.full((b, t + n), loop.pad_id, jnp.int32).at[:, :t].set(tokens_bt)
    logits = jnp.zeros((b, n, config.vocab_size), jnp.float32) if loop.return_logits else None
    state = DecodeState(buffer, cache, jnp.int32(0), jnp.zeros((b,), bool), logits)
    return _emit(loop, state, last_b1v[:, -1], key, stop_ids, sink_id)


def _prefill_pieces(loop, params, tokens_bt, positions_bt, segments_bt, cache, merge):
    """-> (logits [B, 1, V] of the last prompt position, the filled cache). The first piece is
    the T % piece remainder (or a whole piece) written from index 0; a `lax.scan` then runs the
    remaining whole pieces, each attending to the cache, so the model compiles twice at most."""
    model, t = loop.model, tokens_bt.shape[1]
    piece = loop.prefill_chunk
    if piece <= 0 or t <= piece or merge is not None:  # (images: one piece, see make_loop)
        return model.apply(
            {"params": params},
            tokens_bt,
            positions_bt,
            segments_bt,
            cache=cache,
            merge_embeds=merge,
            output="last_logits",
            method="forward",
        )
    first = t % piece or piece
    _, cache = model.apply(
        {"params": params},
        tokens_bt[:, :first],
        positions_bt[:, :first],
        segments_bt[:, :first],
        cache=cache,
        output="last_logits",
        method="forward",
    )
    n = (t - first) // piece

    def pieces(x_bt):  # [B, n * piece] -> [n, B, piece]
        return x_bt[:, first:].reshape(x_bt.shape[0], n, piece).swapaxes(0, 1)

    def step(cache, xs):
        i, tok, pos, seg = xs
        logits, cache = model.apply(
            {"params": params},
            tok,
            pos,
            seg,
            cache=cache,
            cache_index=first + i * piece,
            output="last_logits",
            method="forward",
        )
        return cache, logits

    xs = (jnp.arange(n, dtype=jnp.int32), *map(pieces, (tokens_bt, positions_bt, segments_bt)))
    cache, logits_n = jax.lax.scan(step, cache, xs)
    return logits_n[-1], cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _decode(
    loop: _Loop,
    params: Any,
    state: DecodeState,
    lengths_b: Array,
    key: Array,
    stop_ids: Array,
    sink_id: Array,
) -> DecodeState:
    prompt_len = state.tokens.shape[1] - loop.max_new_tokens

    def running(s: DecodeState) -> Array:
        return (s.step < loop.max_new_tokens) & ~jnp.all(s.done)

    def step(s: DecodeState) -> DecodeState:
        index = prompt_len + s.step - 1  # the previous token's index; it is not cached yet
        prev_b1 = jax.lax.dynamic_slice_in_dim(s.tokens, index, 1, axis=1)
        positions_b1 = (lengths_b + s.step - 1)[:, None]
        logits_b1v, cache = loop.decode_model.apply(
            {"params": params},
            prev_b1,
            positions_b1,
            cache=s.cache,
            cache_index=index,
            method="forward",
        )
        return _emit(loop, s._replace(cache=cache), logits_b1v[:, 0], key, stop_ids, sink_id)

    return jax.lax.while_loop(running, step, state)


def _stop_array(stop_ids: Any) -> Array:
    """Stop ids padded with -1 to a multiple of 8 slots, so stop sets rarely recompile."""
    ids = np.asarray(stop_ids, np.int32).reshape(-1)
    slots = max(8, -(-ids.size // 8) * 8)
    return jnp.asarray(np.pad(ids, (0, slots - ids.size), constant_values=-1))


def prefill(
    loop: _Loop,
    params: Any,
    tokens_bt: Any,
    lengths_b: Any,
    key: Array,
    stop_ids: Any,
    sink_id: int = -1,
    image_embeds: Any = None,
    image_token_id: int | None = None,
) -> DecodeState:
    """Run the prompt, fill the cache, sample the first new token (jitted; time to first token).

    `image_embeds` [M, D] (`l4jax.vision`) replace the embeddings of the M `image_token_id`
    tokens of the prompt, in row-major order. A prompt longer than the model's
    `max_position_embeddings` raises ConfigError (naming both numbers)."""
    longest = int(np.max(lengths_b)) if np.size(lengths_b) else 0
    max_pos = loop.model.config.max_position_embeddings
    if longest > max_pos:
        raise ConfigError(
            f"prompt of {longest} tokens exceeds the model's max_position_embeddings={max_pos}"
        )
    return _prefill(
        loop,
        params,
        jnp.asarray(tokens_bt, jnp.int32),
        jnp.asarray(lengths_b, jnp.int32),
        key,
        _stop_array(stop_ids),
        jnp.int32(sink_id),
        None if image_embeds is None else jnp.asarray(image_embeds),
        None if image_embeds is None else jnp.int32(image_token_id),
    )


def decode(
    loop: _Loop,
    params: Any,
    state: DecodeState,
    lengths_b: Any,
    key: Array,
    stop_ids: Any,
    sink_id: int = -1,
) -> DecodeState:
    """Decode the remaining tokens in one on-device loop (donates `state`)."""
    return _decode(
        loop,
        params,
        state,
        jnp.asarray(lengths_b, jnp.int32),
        key,
        _stop_array(stop_ids),
        jnp.int32(sink_id),
    )


def decode_moe_backend(config: Llama4Config, batch: int, decode_moe_impl: str = "auto") -> str:
    """The MoE backend of decode steps. "auto": `gather` (read only the chosen experts) while
    batch * top_k < num_experts and the model uses `ragged_dot` (or `auto` off TPU), else the
    model's own."""
    if decode_moe_impl != "auto":
        return decode_moe_impl
    few_rows = batch * config.num_experts_per_tok < config.num_local_experts
    model_impl = resolve_impl(config.moe_impl)
    return "gather" if few_rows and model_impl == "ragged_dot" else model_impl


def make_loop(
    model: Llama4ForCausalLM,
    batch: int,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    *,
    pad_id: int | None = None,
    chunk_aware_cache: bool = True,
    return_logits: bool = False,
    stream: bool = False,
    decode_moe_impl: str = "auto",
    prefill_chunk: int | None = None,
) -> _Loop:
    """The static description of a generation that `prefill` and `decode` compile for.

    `prefill_chunk`: prompt tokens per prefill piece (default the attention chunk size, 0 or
    None without chunked layers: the whole prompt at once). Prompts with images run as one
    piece (the image embeddings are merged into the whole prompt)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prefill_chunk is None:
        prefill_chunk = model.config.attention_chunk_size or 0
    config = model.config
    pad_id = default_pad_id(config) if pad_id is None else pad_id
    impl = decode_moe_backend(config, batch, decode_moe_impl)
    same = impl == resolve_impl(config.moe_impl)
    decode_model = model if same else type(model)(config.replace(moe_impl=impl))
    sampling = Sampling() if sampling is None else sampling
    return _Loop(
        model,
        decode_model,
        max_new_tokens,
        sampling,
        int(pad_id),
        chunk_aware_cache,
        return_logits,
        stream,
        int(prefill_chunk),
    )


def generate(
    model: Llama4ForCausalLM,
    params: Any,
    prompt_ids: Any,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
    *,
    pad_id: int | None = None,
    pad_to_multiple_of: int = 1,
    chunk_aware_cache: bool = True,
    on_token: Callable[[np.ndarray], None] | None = None,
    return_logits: bool = False,
    decode_moe_impl: str = "auto",
    image_embeds: Any = None,
    image_token_id: int | None = None,
    prefill_chunk: int | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Generate up to `max_new_tokens` ids per prompt; returns ids [B, T + N] (numpy int32).

    `prompt_ids`: one id sequence, a [B, T] array, or a list of sequences of different lengths
    (left-padded with `pad_id`, default `config.pad_token_id` or 0; to a multiple of
    `pad_to_multiple_of`, so that prompts of similar lengths share one compilation). Row b is its
    padded prompt, then its new tokens; after a row emits a stop id (kept in the output) the
    rest of the row is `pad_id`. `stop_ids` replaces the default stop set (`default_stop_ids`:
    <|end_of_text|>, <|eom|>, <|eot|> and the config's eos ids); pass `()` to never stop.

    temperature 0 is greedy; otherwise sampling with temperature, top_k, top_p, reproducible for
    a given `seed`. `on_token(ids [B])` is called with each new token of every row as it is
    generated (pad for finished rows). `return_logits` also returns the fp32 logits [B, N, V]
    that each new token was sampled from. `chunk_aware_cache=False` gives chunked layers a full
    cache too (same results, more memory; for tests). `decode_moe_impl`: the MoE backend of the
    decode steps (`decode_moe_backend`; numerically the same as the model's). `image_embeds`
    [M, D] and `image_token_id`: images of the prompts (`l4jax.preprocess.image_generation_inputs`).
    `prefill_chunk`: prompt tokens per prefill piece (`make_loop`).
    """
    config = model.config
    pad_id = default_pad_id(config) if pad_id is None else int(pad_id)
    tokens_bt, lengths_b = left_pad(prompt_ids, pad_id, config.vocab_size, pad_to_multiple_of)
    total = int(lengths_b.max()) + max_new_tokens
    check_positions(total, config.max_position_embeddings, "generate: prompt + max_new_tokens")
    loop = make_loop(
        model,
        tokens_bt.shape[0],
        max_new_tokens,
        Sampling(float(temperature), top_k, top_p) if temperature else Sampling(),
        pad_id=pad_id,
        chunk_aware_cache=chunk_aware_cache,
        return_logits=return_logits,
        stream=on_token is not None,
        decode_moe_impl=decode_moe_impl,
        prefill_chunk=prefill_chunk,
    )
    stops = default_stop_ids(config) if stop_ids is None else tuple(int(i) for i in stop_ids)
    key = jax.random.key(seed)
    with _sink(on_token) as sink_id:
        state = prefill(
            loop, params, tokens_bt, lengths_b, key, stops, sink_id, image_embeds, image_token_id
        )
        state = decode(loop, params, state, lengths_b, key, stops, sink_id)
        ids = np.asarray(state.tokens)
    if return_logits:
        return ids, np.asarray(state.logits)
    return ids


# ---- command line: `l4jax generate` and `l4jax chat` ---------------------------------------


def load_for_generation(
    checkpoint: str | None = None,
    preset_name: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    vision: bool = False,
) -> tuple[Llama4ForCausalLM, Any, Tokenizer]:
    """(model, params, tokenizer) from a checkpoint directory or a random preset model.

    The tokenizer is the checkpoint's (tokenizer.model / tokenizer.json) if it has one, else
    `Tokenizer.default()`. A random preset model is built with the tokenizer's vocabulary size
    (its own is a small placeholder); a checkpoint whose vocabulary is smaller than the
    tokenizer's is refused. `vision`: a multimodal checkpoint gives the multimodal model.
    """
    if (checkpoint is None) == (preset_name is None):
        raise ConfigError("give exactly one of a checkpoint directory or a preset name")
    if checkpoint is not None:
        path = Path(checkpoint)
        has_tokenizer = any((path / f).is_file() for f in ("tokenizer.model", "tokenizer.json"))
        tokenizer = Tokenizer.from_pretrained(path) if has_tokenizer else Tokenizer.default()
        source = f"{checkpoint}/config.json: vocab_size"
        text_vocab = source_config(open_checkpoint(path)).vocab_size  # check before loading
        if text_vocab < tokenizer.n_words:
            raise ConfigError(
                f"{source} {text_vocab} is smaller than the tokenizer's {tokenizer.n_words} "
                f"ids ({tokenizer.source}); put the checkpoint's own tokenizer next to it"
            )
        model, params = from_pretrained(checkpoint, dtype=dtype, text_only=not vision)
    else:
        tokenizer = Tokenizer.default()
        name = dtype or "float32"
        config = preset(preset_name, vocab_size=tokenizer.n_words, dtype=name, param_dtype=name)
        log.info(
            "random %r model (%.1fM params, vocab_size set to the tokenizer's %d)",
            preset_name,
            config.num_params() / 1e6,
            tokenizer.n_words,
        )
        model, params = Llama4ForCausalLM(config), init_params(config, seed)
        source = f"preset {preset_name!r}: vocab_size"
    vocab_size = getattr(model.config, "text", model.config).vocab_size
    if vocab_size < tokenizer.n_words:
        raise ConfigError(
            f"{source} {vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.n_words} ids ({tokenizer.source}); use the checkpoint's own tokenizer"
        )
    return model, params, tokenizer


def stream_generate(
    model: Llama4ForCausalLM,
    params: Any,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    write: Callable[[str], Any],
    **generate_kwargs: Any,
) -> tuple[list[int], int | None]:
    """Generate for one prompt, writing text pieces as tokens arrive (`Tokenizer.decode_stream`).

    Returns (new ids before the stop token, the stop id or None if max_new_tokens ran out).
    """
    stops = set(generate_kwargs.setdefault("stop_ids", tokenizer.stop_tokens))
    arrived: queue.Queue[int | None] = queue.Queue()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            generate(
                model,
                params,
                [prompt_ids],
                on_token=lambda t: arrived.put(int(t[0])),
                **generate_kwargs,
            )
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)
        finally:
            arrived.put(None)

    new_ids: list[int] = []
    stop: list[int] = []

    def text_ids() -> Iterator[int]:
        for token in iter(arrived.get, None):
            if token in stops:
                stop.append(token)
                return
            new_ids.append(token)
            yield token

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    for piece in tokenizer.decode_stream(text_ids()):
        write(piece)
    worker.join()
    if failure:
        raise failure[0]
    return new_ids, (stop[0] if stop else None)


def read_chat_json(path: str | Path) -> list[Message]:
    """A JSON list of {"role", "content"[, "context"]} messages (text only)."""
    try:
        items = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path}: expected a non-empty JSON list of messages")
    messages = []
    for i, item in enumerate(items):
        roles = ("system", "user", "assistant", "ipython", "tool")
        if not isinstance(item, dict) or item.get("role") not in roles:
            raise ConfigError(f"{path}: message {i} needs a role in {roles}, got {item!r}")
        content = item.get("content")
        if not isinstance(content, str):
            raise ConfigError(f"{path}: message {i} content must be text, got {content!r}")
        messages.append(Message(item["role"], content, context=item.get("context")))
    return messages


def chat_loop(
    model: Llama4ForCausalLM,
    params: Any,
    tokenizer: Tokenizer,
    lines: Iterator[str],
    write: Callable[[str], Any],
    system: str | None = None,
    images: ChatImages | None = None,
    **generate_kwargs: Any,
) -> tuple[list[Message], int]:
    """Interactive chat: each line from `lines` is a user turn; replies stream to `write`.

    Every turn re-encodes the whole dialog (Meta's chat format). "/image PATH" queues an image
    for the next user turn (`images`: an `l4jax.preprocess.ChatImages`, whose text model
    `model` is; None for a text-only model). A turn with bad image input is skipped with a
    one-line error on stderr (its images stay queued). Ends at EOF or "/exit"; returns (the
    dialog, the number of turns skipped).
    """
    messages = [Message("system", system)] if system else []
    skipped = 0
    for line in lines:
        text = line.rstrip("\n")
        command, _, arg = text.strip().partition(" ")
        if command in ("/exit", "/quit"):
            break
        if not text.strip():
            continue
        try:
            if command == "/image":
                if images is None:
                    raise ImageError("images need a multimodal checkpoint")
                images.add(arg.strip())
                write(f"(image {arg.strip()}: in your next message)\n")
                continue
            if images is None:
                user, extra = Message("user", text), {}
                prompt = tokenizer.encode_dialog_prompt([*messages, user])
            else:
                user = images.user_message(text)
                prompt, extra = images.encode([*messages, user])
        except ImageError as e:
            print(f"l4jax chat: error: {e}", file=sys.stderr)
            skipped += 1
            continue
        messages.append(user)
        write("assistant> ")
        reply_ids, stop = stream_generate(
            model, params, tokenizer, prompt, write, **generate_kwargs, **extra
        )
        write("\n")
        reason = "end_of_message" if stop == tokenizer.eom_id else "end_of_turn"
        if stop is None:
            reason = "out_of_tokens"
        messages.append(Message("assistant", tokenizer.decode(reply_ids), stop_reason=reason))
    return messages, skipped


def add_generation_arguments(p: argparse.ArgumentParser, chat: bool) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory (Hugging Face, Meta or l4jax)")
    src.add_argument("--preset", choices=sorted(PRESETS), help="a random model of this preset")
    if chat:
        p.add_argument("--system", help="system prompt")
    else:
        prompt = p.add_mutually_exclusive_group(required=True)
        prompt.add_argument("--prompt", help="text to continue (<|begin_of_text|> + text)")
        prompt.add_argument(
            "--prompt-file",
            metavar="PATH",
            help="UTF-8 text file to continue, for long prompts (as --prompt)",
        )
        prompt.add_argument(
            "--chat-json", help='file with a JSON list of {"role", "content"} messages'
        )
    where = "the first user turn" if chat else "the prompt text / first user message"
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help=f"an image in {where}, at its <|image|> placeholders if it has any, else before "
        "its text (repeatable; needs a multimodal checkpoint)",
    )
    p.add_argument(
        "--pixel-dtype",
        choices=PIXEL_DTYPES,
        default="float32",
        help="image normalisation precision: bfloat16 rounds as Hugging Face's processor does "
        "when asked for bfloat16 pixels (default: float32, Meta's)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0, help="sampling (and random preset) seed")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), help="default: the checkpoint's, float32"
    )
    p.add_argument(
        "--quantize",
        choices=MODES,
        help="quantize the text model's weights after loading (l4jax.quantize: int4 = Meta's "
        "int4_mixed, fp8 = its fp8_mixed, int8 per channel; docs/quantization.md)",
    )


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        pad_to_multiple_of=64,  # chat turns of similar length reuse one compilation
    )


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _check_images(paths: Sequence[str]) -> None:
    """Unreadable image files fail before a checkpoint is loaded (ImageError naming the file)."""
    from l4jax.preprocess import load_image

    for path in paths:
        load_image(path)


def read_prompt_file(path: str) -> str:
    """The text of a UTF-8 prompt file (ConfigError naming the file if unreadable)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the prompt file ({e})") from None


def run_generate_cli(args: argparse.Namespace) -> int:
    """`l4jax generate`: one completion, streamed to stdout."""
    if args.prompt_file is not None:
        args.prompt = read_prompt_file(args.prompt_file)
    messages = None if args.prompt is not None else read_chat_json(args.chat_json)
    _check_images(args.image)
    model, params, tokenizer = load_for_generation(
        args.checkpoint, args.preset, args.dtype, args.seed, vision=bool(args.image)
    )
    images: dict[str, Any] = {}
    if args.image:
        from l4jax.preprocess import image_generation_inputs

        model, params, prompt, images = image_generation_inputs(
            model, params, tokenizer, args.image, args.prompt, messages, args.pixel_dtype
        )
    elif messages is None:
        prompt = tokenizer.encode(args.prompt, bos=True, eos=False)
    else:
        prompt = tokenizer.encode_dialog_prompt(messages)
    log.info("prompt: %d tokens, %d image(s)", len(prompt), len(args.image))
    params = quantize_logged(params, model.config, args.quantize)
    stream_generate(model, params, tokenizer, prompt, _write, **_sampling_kwargs(args), **images)
    _write("\n")
    return 0


def run_chat_cli(args: argparse.Namespace) -> int:
    """`l4jax chat`: read user turns from stdin until EOF or /exit. Exit status 2 if a turn
    was skipped for bad image input."""
    _check_images(args.image)
    model, params, tokenizer = load_for_generation(
        args.checkpoint, args.preset, args.dtype, args.seed, vision=True
    )
    images = None
    if args.image or hasattr(model.config, "vision"):  # ("/image" needs the vision tower)
        from l4jax.preprocess import ChatImages

        images = ChatImages(model, params, tokenizer, args.pixel_dtype)
        for path in args.image:  # (in the first user turn)
            images.add(path)
        model, params = images.text_model, images.text_params
    params = quantize_logged(params, model.config, args.quantize)
    interactive = sys.stdin.isatty()

    def lines() -> Iterator[str]:
        while True:
            if interactive:
                _write("user> ")
            line = sys.stdin.readline()
            if not line:
                return
            yield line

    kwargs = _sampling_kwargs(args)
    _, skipped = chat_loop(model, params, tokenizer, lines(), _write, args.system, images, **kwargs)
    return 2 if skipped else 0
