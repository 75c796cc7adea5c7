"""KV-cache generation against transformers' generate and against the cache-free forward.

Configs use chunk 16-32 and floor_scale 8-16 with up to 120 tokens per row, so prompts and
generations cross several chunk boundaries (where the chunked layers' ring cache wraps) and
temperature-tuning floors.
"""

import functools
import importlib
import io
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import MAVERICK_LIKE, SCOUT_LIKE, TOP2_LIKE, build_hf_model
from jax.sharding import Mesh, NamedSharding
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import l4jax
from l4jax import cli, moe, preset
from l4jax.decoding import decode_moe_backend, default_stop_ids, make_loop, prefill
from l4jax.errors import ConfigError
from l4jax.kv_cache import cache_bytes, cache_lengths, cache_logical_axes, init_cache, tree_bytes
from l4jax.model import write_cache
from l4jax.quantization import QArray
from l4jax.sampling import Sampling, sample

LENGTHS = (40, 23, 9)
NEW = 64
PROMPTS = [np.random.default_rng(0).integers(0, 256, n) for n in LENGTHS]
# 2 layers (one scan group: 1 chunked RoPE layer + 1 NoPE layer) keep transformers' eager
# generate and l4jax's compile fast; scout_like: chunk 16, floor 16, qk-norm, all MoE;
# maverick_like: chunk 32, floor 8, a dense and a MoE layer
HF_CONFIGS = {
    "scout_like": dict(SCOUT_LIKE, num_hidden_layers=2, no_rope_layer_interval=2),
    "maverick_like": dict(MAVERICK_LIKE, num_hidden_layers=2, no_rope_layer_interval=2),
}
TINY = preset(
    "tiny", num_hidden_layers=2, no_rope_layer_interval=2, attention_chunk_size=16, floor_scale=16
)


def _hf_generate(hf, prompts_bt, mask_bt, new):
    with torch.no_grad():
        out = hf.generate(
            torch.as_tensor(np.asarray(prompts_bt, np.int64)),
            attention_mask=torch.as_tensor(np.asarray(mask_bt, np.int64)),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, -new:].numpy()


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def hf_pair(request, tmp_path_factory):
    hf = build_hf_model(HF_CONFIGS[request.param], seed=1)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, path


def test_greedy_matches_transformers_generate(hf_pair):
    """A batch of prompts of different lengths decodes, row for row, exactly what transformers
    generates for each prompt alone (64 new tokens, up to 104 positions)."""
    hf, path = hf_pair
    model, params = l4jax.from_pretrained(path)
    ids = l4jax.generate(model, params, PROMPTS, NEW, stop_ids=())
    assert ids.shape == (len(PROMPTS), max(LENGTHS) + NEW)
    for b, prompt in enumerate(PROMPTS):
        ref = _hf_generate(hf, prompt[None], np.ones((1, len(prompt))), NEW)[0]
        np.testing.assert_array_equal(ids[b, -NEW:], ref, err_msg=f"row {b}")
        assert len(set(ref.tolist())) > 10  # not a degenerate repetition
        np.testing.assert_array_equal(ids[b, max(LENGTHS) - len(prompt) : max(LENGTHS)], prompt)


def test_left_padded_batch_matches_transformers_batch(tmp_path):
    """Against transformers' own left-padded batch: same RoPE positions and chunk boundaries.
    (transformers computes temperature tuning from the padded index, so a padded row's result
    depends on its padding there; hence tuning is off for this comparison.)"""
    hf = build_hf_model(dict(HF_CONFIGS["maverick_like"], attn_temperature_tuning=False), seed=1)
    hf.save_pretrained(tmp_path)
    model, params = l4jax.from_pretrained(tmp_path)
    t = max(LENGTHS)
    tokens, mask = np.zeros((3, t), np.int64), np.zeros((3, t), np.int64)
    for b, prompt in enumerate(PROMPTS):
        tokens[b, t - len(prompt) :], mask[b, t - len(prompt) :] = prompt, 1
    ids = l4jax.generate(model, params, PROMPTS, NEW, stop_ids=())
    np.testing.assert_array_equal(ids[:, t:], _hf_generate(hf, tokens, mask, NEW))


def random_params(config, seed=0):
    """Random weights as `torch_ref.build_hf_model` draws them, without compiling init_params
    (whose forward pass takes longer to compile than a whole generation)."""
    shapes = jax.eval_shape(functools.partial(l4jax.init_params, config, 0))
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return (1 + 0.1 * rng.standard_normal(shape.shape)).astype(np.float32)
        std = 0.5 if "embed_tokens" in name else 0.08
        return (std * rng.standard_normal(shape.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny():
    return l4jax.Llama4ForCausalLM(TINY), random_params(TINY, 3)


def _no_cache_logits(model, params, ids, prompt_len, lengths):
    """Logits of the cache-free forward on the left-padded output, at the steps that sampled."""
    index = np.arange(ids.shape[1])
    pad = prompt_len - np.asarray(lengths)
    positions = np.maximum(index[None] - pad[:, None], 0)
    segments = (index[None] >= pad[:, None]).astype(np.int32)
    logits = jax.jit(model.apply)({"params": params}, jnp.asarray(ids), positions, segments)
    return np.asarray(logits)[:, prompt_len - 1 : -1]


def test_decode_logits_equal_no_cache_forward_and_full_cache(tiny):
    """Every decode step's logits equal the cache-free forward's; the chunk-aware ring cache and
    a full-length cache give the same tokens and logits; streamed tokens are the output's."""
    model, params = tiny
    prompts = [p % TINY.vocab_size for p in PROMPTS]
    streamed = []
    ring_ids, ring_logits = l4jax.generate(
        model, params, prompts, 60, stop_ids=(), return_logits=True, on_token=streamed.append
    )
    np.testing.assert_array_equal(np.stack(streamed, axis=1), ring_ids[:, max(LENGTHS) :])
    full_ids, full_logits = l4jax.generate(
        model, params, prompts, 60, stop_ids=(), return_logits=True, chunk_aware_cache=False
    )
    ref = _no_cache_logits(model, params, ring_ids, max(LENGTHS), LENGTHS)
    scale = np.abs(ref).max()
    assert np.abs(ring_logits - ref).max() < 1e-5 * scale
    np.testing.assert_array_equal(ring_ids, full_ids)
    assert np.abs(ring_logits - full_logits).max() < 1e-5 * scale
    # the chunked layers really held a 16-slot ring, the NoPE layer every index
    kinds = TINY.layer_kinds[: TINY.scan_period]
    assert [k.chunked for k in kinds] == [True, False]
    assert cache_lengths(TINY, 99) == (16, 99)
    assert cache_lengths(TINY, 99, chunk_aware=False) == (99,) * 2


def test_cache_bytes_measured_and_scout_arithmetic():
    cache = init_cache(TINY, batch=2, max_len=200)
    per_layer_token = 2 * TINY.num_key_value_heads * TINY.head_dim * 4  # K and V, fp32
    groups = TINY.num_hidden_layers // TINY.scan_period
    expected = 2 * groups * per_layer_token * (16 + 200)  # 1 ring slot of 16, 1 full
    assert tree_bytes(cache) == expected == cache_bytes(TINY, 200, batch=2, dtype="float32")
    assert cache_bytes(TINY, 200, chunk_aware=False, batch=2, dtype="float32") == (
        2 * groups * per_layer_token * 2 * 200
    )
    # Scout, bf16: 12 NoPE layers keep every token, 36 chunked layers 8192 tokens each
    scout = preset("scout")
    assert sum(scout.rope_layers) == sum(scout.chunked_layers) == 36
    per_token = 2 * 8 * 128 * 2
    for tokens in (2**20, 10 * 2**20):
        assert cache_bytes(scout, tokens) == per_token * (12 * tokens + 36 * 8192)
        assert cache_bytes(scout, tokens, chunk_aware=False) == per_token * 48 * tokens


def test_int8_cache_holds_each_entry_within_half_a_step():
    """An int8 cache stores each written entry within half a quantization step of its value
    (one fp32 scale per token and kv head: amax / 127), through the ring's wrap-around too,
    in (1 + 4 / head_dim) / 2 of bfloat16's bytes; other dtypes are a ConfigError."""
    rng = np.random.default_rng(0)
    k, h = TINY.num_key_value_heads, TINY.head_dim
    ring = init_cache(TINY, 2, 40, dtype="int8")["layer_0"]["k"]  # chunked: a 16-slot ring
    ring = QArray(ring.qvalue[0], ring.scale[0])  # (one layer group)
    new = rng.standard_normal((2, 20, k, h)) * rng.uniform(0.01, 10, (2, 20, k, 1))
    written = write_cache(ring, jnp.asarray(new, jnp.float32), 7)  # indices 7..26: 11..26 kept
    slots = np.arange(11, 27) % 16
    step = np.abs(new[:, 4:]).max(-1, keepdims=True) / 127
    assert written.qvalue.dtype == jnp.int8 and written.scale.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(written.scale)[:, slots], step, rtol=1e-6)
    error = np.abs(np.asarray(written.astype(jnp.float32))[:, slots] - new[:, 4:])
    assert (error <= step / 2 * (1 + 1e-5)).all() and error.max() > 0
    assert tree_bytes(init_cache(TINY, 2, 200, dtype="int8")) == cache_bytes(
        TINY, 200, batch=2, dtype="int8"
    )
    ratio = cache_bytes(TINY, 1000, dtype="int8") / cache_bytes(TINY, 1000, dtype="bfloat16")
    assert ratio == (1 + 4 / h) / 2
    with pytest.raises(ConfigError, match="kv cache dtype 'int4'"):
        init_cache(TINY, 1, 4, dtype="int4")


def test_generation_with_an_int8_cache(tiny):
    """Prefill pieces and decode steps read the int8 cache: the first new token's logits within
    2e-3 of the float32 cache's (relative to their largest; measured 4e-4), and not equal
    to them (the cache really is quantized); every layer's cache is int8."""
    model, params = tiny
    prompts = np.random.default_rng(2).integers(0, TINY.vocab_size, (2, 60))  # 4 pieces of 16

    def first_logits(kv_cache_dtype):
        loop = make_loop(model, 2, 1, return_logits=True, kv_cache_dtype=kv_cache_dtype)
        state = prefill(loop, params, prompts, np.array([60, 45]), jax.random.key(0), ())
        return state, np.asarray(state.logits[:, 0])

    state, int8 = first_logits("int8")
    _, want = first_logits(None)
    assert {x.dtype.name for x in jax.tree.leaves(state.cache)} == {"int8", "float32"}
    assert all(isinstance(c["k"], QArray) for c in state.cache.values())
    error = np.abs(int8 - want).max() / np.abs(want).max()
    assert 0 < error < 2e-3, error


def test_sampling_is_seeded_and_rows_finish_independently(tiny):
    model, params = tiny
    prompts = [p % TINY.vocab_size for p in PROMPTS]
    kwargs = dict(temperature=1.0, top_k=40, top_p=0.95, stop_ids=())
    a = l4jax.generate(model, params, prompts, 24, seed=7, **kwargs)
    np.testing.assert_array_equal(a, l4jax.generate(model, params, prompts, 24, seed=7, **kwargs))
    assert (a != l4jax.generate(model, params, prompts, 24, seed=8, **kwargs)).any()
    # stop handling: stop on a token row 0 samples at step 5; rows end at their first stop id
    stop = int(a[0, max(LENGTHS) + 5])
    b = l4jax.generate(model, params, prompts, 24, seed=7, **{**kwargs, "stop_ids": (stop,)})
    t = max(LENGTHS)
    for row in range(len(prompts)):
        hits = np.nonzero(a[row, t:] == stop)[0]
        end = hits[0] + 1 if hits.size else 24
        np.testing.assert_array_equal(b[row, : t + end], a[row, : t + end])
        assert (b[row, t + end :] == 0).all()  # pad id 0 after the stop id
    assert (b[0, t + 6 :] == 0).all()  # row 0 stopped by step 5


def test_sampling_filters_match_transformers():
    """top-k and top-p keep the same token sets as transformers' warpers; greedy is argmax."""
    logits = np.random.default_rng(0).normal(size=(6, 300)).astype(np.float32) * 3
    for sampling in (Sampling(1.0, top_k=5), Sampling(0.7, top_p=0.8), Sampling(1.3, 20, 0.5)):
        warpers = []
        if sampling.top_k:
            warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p:
            warpers.append(TopPLogitsWarper(sampling.top_p))
        ref = torch.from_numpy(logits / sampling.temperature)
        for warper in warpers:
            ref = warper(None, ref)
        allowed = np.isfinite(ref.numpy())
        keys = jax.random.split(jax.random.key(0), 200)
        draws = np.asarray(jax.vmap(lambda k, s=sampling: sample(jnp.asarray(logits), k, s))(keys))
        drawn = np.zeros_like(allowed)
        np.put_along_axis(drawn, draws.T, True, axis=1)
        assert (allowed | ~drawn).all(), sampling  # only allowed tokens are drawn
        assert drawn.sum() > logits.shape[0], sampling  # and not just the argmax
    greedy = sample(jnp.asarray(logits), jax.random.key(0), Sampling())
    np.testing.assert_array_equal(greedy, logits.argmax(-1))


def test_input_errors_and_stop_defaults(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match="id 600 outside the model's vocabulary"):
        l4jax.generate(model, params, [[1, 600]], 4)
    with pytest.raises(ValueError, match="prompt 1 must be a non-empty"):
        l4jax.generate(model, params, [[1], []], 4)
    assert default_stop_ids(TINY) == ()
    assert default_stop_ids(preset("scout")) == (200001, 200007, 200008)


def test_cache_shards_by_logical_axes(tiny):
    """Under a mesh and logical rules the cache's batch axis is sharded like activations."""
    model, params = tiny
    rules = (("cache_batch", "data"), ("activation_batch", "data"))
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    prompts = np.random.default_rng(1).integers(0, TINY.vocab_size, (8, 12))
    loop = make_loop(model, 8, 5)
    ref = prefill(loop, params, prompts, np.full(8, 12), jax.random.key(0), ())
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = prefill(loop, params, prompts, np.full(8, 12), jax.random.key(0), ())
    spec = state.cache["layer_0"]["k"].sharding
    assert isinstance(spec, NamedSharding) and spec.spec[1] == "data"
    np.testing.assert_array_equal(state.tokens, ref.tokens)
    for dtype in (None, "int8"):  # (int8: a QArray of values and scales per k and v)
        axes = cache_logical_axes(TINY, dtype)
        assert jax.tree.structure(axes) == jax.tree.structure(init_cache(TINY, 1, 4, dtype=dtype))


def test_cli_generate_chat_and_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(importlib.import_module("l4jax.generate_cli"), "init_params", random_params)
    args = ["--preset", "tiny", "--max-new-tokens", "3", "--temperature", "0"]
    assert cli.main(["generate", "--prompt", "Hello", *args]) == 0
    assert capsys.readouterr().out.strip()
    assert cli.main(["generate", "--prompt", "Hello", *args, "--kv-cache-dtype", "int8"]) == 0
    assert capsys.readouterr().out.strip()
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\nhow are you?\n/exit\nignored\n"))
    assert cli.main(["chat", *args]) == 0
    assert capsys.readouterr().out.count("assistant> ") == 2
    # bad input: a checkpoint whose vocabulary is smaller than the tokenizer's, bad chat JSON
    build_hf_model(TOP2_LIKE, seed=0).save_pretrained(tmp_path / "small")
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "small"), "--prompt", "Hi"]) == 2
    assert "vocab_size 256 is smaller than the tokenizer's 202048" in capsys.readouterr().err
    bad = tmp_path / "chat.json"
    bad.write_text(json.dumps([{"role": "robot", "content": "hi"}]))
    assert cli.main(["generate", "--preset", "tiny", "--chat-json", str(bad)]) == 2
    assert "message 0 needs a role" in capsys.readouterr().err
    # a mesh the devices cannot form fails before any checkpoint is read
    missing = ["--checkpoint", str(tmp_path / "missing"), "--prompt", "Hi"]
    assert cli.main(["generate", *missing, "--mesh", "sequence=3"]) == 2
    assert "mesh spec 'sequence=3'" in capsys.readouterr().err
    assert cli.main(["chat", "--checkpoint", str(tmp_path / "missing"), "--mesh", "x=1"]) == 2
    assert "mesh spec 'x=1'" in capsys.readouterr().err


def test_gather_backend_matches_dense_oracle():
    """The decode-step MoE backend (`gather`) computes what the dense oracle does, also for an
    expert-parallel shard (experts 4..7 of 8), and is chosen while batch * k < experts."""
    rng = np.random.default_rng(0)
    t, d, f, e, k = 5, 16, 24, 8, 2
    shapes = [(e, d, f), (e, d, f), (e, f, d)]
    w = moe.ExpertWeights(*(jnp.asarray(0.1 * rng.normal(size=s), jnp.float32) for s in shapes))
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    ids = jnp.asarray([rng.permutation(e)[:k] for _ in range(t)], jnp.int32)  # as top-k
    scores = jnp.asarray(rng.uniform(size=(t, k)), jnp.float32)
    for weights, offset in ((w, 0), (moe.ExpertWeights(*(a[4:] for a in w)), 4)):
        got = moe.gathered_experts(x, ids, scores, weights, expert_offset=offset)
        ref = moe.dense_experts(x, ids, scores, weights, expert_offset=offset)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert decode_moe_backend(TINY, batch=7) == "gather"  # 8 experts, top-1
    assert decode_moe_backend(TINY, batch=8) == "ragged_dot"
    assert decode_moe_backend(TINY.replace(moe_impl="dense"), batch=1) == "dense"
