"""KV-cache text generation: jitted prefill, an on-device decode loop, stop handling.

    ids = l4jax.generate(model, params, [[1, 2, 3], [4, 5]], max_new_tokens=32)   # [B, T + N]

Batches of prompts with different lengths are LEFT-padded to a common length T. Every row keeps
its own absolute positions (0 at its first real token) for RoPE, chunk boundaries and the NoPE
temperature tuning, so a row generates exactly what it would generate alone (pad keys are masked
out). `transformers` agrees on RoPE positions and chunk boundaries (its chunked mask is shifted by
the left padding) but computes temperature tuning from the padded index; see docs/inference.md.

The cache (`l4jax.kv_cache`) is one `{"k", "v"}` pair of [G, B, S, K, H] arrays per scan slot:
NoPE/global layers keep every index (S = T + N - 1), chunked RoPE layers a ring of
S = min(attention_chunk_size, T + N - 1) slots. Sampling is `l4jax.sampling`; the command
line, `l4jax.generate_cli`. Prefill runs the prompt in pieces of `prefill_chunk` tokens
(default the attention chunk size; on a `sequence` mesh the whole prompt, which is split over
the shards and attends through the ring, `l4jax.context_parallel`): the first piece (the
remainder T % piece) attends within itself, every later piece attends to the cache and
itself (`l4jax.model.cached_attention`) and is stored, and only the last position's logits are
computed, so a long prompt needs the cache plus one piece's activations. Then one
`jax.lax.while_loop` decodes (one token per row and iteration) until every row has stopped or
N tokens exist. Shapes are static: B batch, T padded prompt length, N max new tokens, V vocab.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback
from jax.sharding import NamedSharding, PartitionSpec

from l4jax import context_parallel
from l4jax.config import Llama4Config
from l4jax.inputs import check_positions, check_token_ids
from l4jax.kv_cache import check_cache_dtype, init_cache
from l4jax.model import Llama4ForCausalLM
from l4jax.moe import resolve_impl
from l4jax.sampling import Sampling, sample
from l4jax.vision import replace_image_embeddings

Array = jax.Array
# <|end_of_text|>, <|eom|>, <|eot|>: the Llama 4 tokenizer's stop tokens
LLAMA4_STOP_IDS = (200001, 200007, 200008)


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
    prefill_chunk: int | None  # prompt tokens per piece (0: the whole prompt; None: default)
    kv_cache_dtype: str | None  # (None: the compute dtype)


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
    # under context parallelism the global layers' caches split over the sequence shards
    cp = context_parallel.for_mesh()
    shards = 1 if cp is None else cp.shards
    cache = init_cache(
        config, b, t + n - 1, chunk_aware=loop.chunk_aware, dtype=loop.kv_cache_dtype,
        multiple=shards,
    )  # fmt: skip
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
    piece = loop.prefill_chunk
    if piece is None:  # on a sequence mesh the whole prompt through the ring (pieces would
        # read the sharded cache by flash-decoding: a query per piece over every shard)
        piece = 0 if cp is not None else (config.attention_chunk_size or 0)
    if t <= piece or merge is not None:  # (images: one piece, see make_loop)
        piece = 0
    if cp is not None and piece <= 0:
        # one piece, through the ring: its length must split (a first piece of several may
        # not, and then attends as one array, `l4jax.model.Attention`)
        cp.check_length(t, None)
        if any(config.chunked_layers):
            cp.check_length(t, config.attention_chunk_size)
    last_b1v, cache = _prefill_pieces(
        loop.model, params, piece, tokens_bt, positions_bt, segments_bt, cache, merge
    )
    buffer = jnp.full((b, t + n), loop.pad_id, jnp.int32).at[:, :t].set(tokens_bt)
    logits = jnp.zeros((b, n, config.vocab_size), jnp.float32) if loop.return_logits else None
    state = DecodeState(buffer, cache, jnp.int32(0), jnp.zeros((b,), bool), logits)
    return _emit(loop, state, last_b1v[:, -1], key, stop_ids, sink_id)


def _prefill_pieces(model, params, piece, tokens_bt, positions_bt, segments_bt, cache, merge):
    """-> (logits [B, 1, V] of the last prompt position, the filled cache). The first piece is
    the T % piece remainder (or a whole piece) written from index 0; a `lax.scan` then runs the
    remaining whole pieces, each attending to the cache, so the model compiles twice at most.
    `piece` <= 0: the whole prompt in one piece."""
    t = tokens_bt.shape[1]
    if piece <= 0:
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
    `max_position_embeddings` raises InputError (naming both numbers)."""
    longest = int(np.max(lengths_b)) if np.size(lengths_b) else 0
    check_positions(longest, loop.model.config.max_position_embeddings, "prefill: prompt")
    return _prefill(
        loop,
        params,
        jnp.asarray(tokens_bt, jnp.int32),
        jnp.asarray(lengths_b, jnp.int32),
        key,
        _stop_array(stop_ids),
        jnp.int32(sink_id),
        None if image_embeds is None else _replicated(jnp.asarray(image_embeds)),
        None if image_embeds is None else jnp.int32(image_token_id),
    )


def _replicated(x: Array) -> Array:
    """`x` on every device of the ambient mesh, if any (the vision tower's output sits on the
    device its params were loaded on, which a jit over the mesh would not accept)."""
    mesh = jax.sharding.get_mesh()
    return x if mesh.empty else jax.device_put(x, NamedSharding(mesh, PartitionSpec()))


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
    kv_cache_dtype: str | None = None,
) -> _Loop:
    """The static description of a generation that `prefill` and `decode` compile for.

    `prefill_chunk`: prompt tokens per prefill piece (0: the whole prompt at once). Default:
    the attention chunk size (the whole prompt without chunked layers); under context
    parallelism (a `sequence` mesh when prefill traces) the whole prompt, whose NoPE layers
    then attend through the ring; pieces there read the sequence-sharded cache by
    flash-decoding (every shard's slots for each piece: less activation memory, more passes
    over the cache). Prompts with images run as one piece (the image embeddings are merged into
    the whole prompt)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
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
        None if prefill_chunk is None else int(prefill_chunk),
        check_cache_dtype(kv_cache_dtype),
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
    kv_cache_dtype: str | None = None,
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
    [M, D] and `image_token_id`: images of the prompts
    (`l4jax.image_prompts.image_generation_inputs`). `kv_cache_dtype`: how the KV cache is
    stored (`l4jax.kv_cache.KV_CACHE_DTYPES`; default the compute dtype; "int8" quantizes each
    entry with its own fp32 scale per kv head, about half of bfloat16's memory).
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
        kv_cache_dtype=kv_cache_dtype,
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
