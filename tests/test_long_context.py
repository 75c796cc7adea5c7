"""Long context: logits vs transformers over thousands of tokens, chunked prefill, blockwise
cross-entropy, and the long-prompt checks of `l4jax generate`."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import SCOUT_LIKE, build_hf_model, hf_logits, rel_err

import l4jax
from l4jax import Llama4ForCausalLM, cli, init_params, preset
from l4jax.decoding import make_loop, prefill
from l4jax.errors import InputError
from l4jax.model import lm_head_weights

RNG = np.random.default_rng(0)


@pytest.mark.slow
def test_logits_match_transformers_over_thousands_of_tokens(tmp_path):
    """2,500 tokens of a Scout-like config with chunk 16 and floor_scale 16: ~150 chunks and
    temperature floors; l4jax's blockwise attention (the `auto` choice at this length) and its
    einsum oracle both match transformers' eager attention."""
    # 2 layers: one chunked RoPE layer, one NoPE layer (both attention kinds, half the compile)
    hf_cfg = dict(
        SCOUT_LIKE, num_hidden_layers=2, no_rope_layer_interval=2, max_position_embeddings=4096
    )
    hf = build_hf_model(hf_cfg, seed=1)
    hf.save_pretrained(tmp_path)
    tokens = RNG.integers(0, 256, (1, 2500))
    ref = hf_logits(hf, tokens)
    for impl in ("blockwise", "xla"):
        model, params = l4jax.from_pretrained(tmp_path, attention_impl=impl)
        got = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens))
        assert rel_err(got, ref) < 1e-4, impl


# 2 layers: one chunked RoPE layer (dense FFN), one NoPE layer (MoE)
TINY = preset(
    "tiny",
    num_hidden_layers=2,
    no_rope_layer_interval=2,
    attention_chunk_size=16,
    floor_scale=16,
    attention_impl="blockwise",
)


@pytest.fixture(scope="module")
def tiny():
    return Llama4ForCausalLM(TINY), init_params(TINY, rng=3)


@pytest.mark.slow
def test_chunked_prefill_equals_whole_prefill_and_greedy_equals_forward_argmax(tiny):
    """Left-padded prompts crossing many chunks: prefill in pieces of 16 (the attention chunk)
    or 40 tokens gives the whole prefill's tokens and logits, and greedy tokens are the argmax
    of the cache-free forward over prompt + generated tokens."""
    model, params = tiny
    lengths = (150, 111)
    prompts = [RNG.integers(0, TINY.vocab_size, n) for n in lengths]
    new = 10
    whole_ids, whole_logits = l4jax.generate(
        model, params, prompts, new, stop_ids=(), return_logits=True, prefill_chunk=0
    )
    for piece in (None, 40):  # None: the attention chunk size (16)
        ids, logits = l4jax.generate(
            model, params, prompts, new, stop_ids=(), return_logits=True, prefill_chunk=piece
        )
        np.testing.assert_array_equal(ids, whole_ids)
        np.testing.assert_allclose(logits, whole_logits, atol=1e-4)
    t = max(lengths)
    pad = t - np.asarray(lengths)[:, None]
    index = np.arange(whole_ids.shape[1])[None]
    positions, segments = np.maximum(index - pad, 0), (index >= pad).astype(np.int32)
    ref = model.apply({"params": params}, jnp.asarray(whole_ids), positions, segments)
    ref = np.asarray(ref)[:, t - 1 : -1]
    np.testing.assert_array_equal(np.argmax(ref, -1), whole_ids[:, t:])
    np.testing.assert_allclose(whole_logits, ref, atol=1e-4)


def _drawn_params(config, seed=0):
    """Random weights without compiling init_params (its forward compiles longer than a whole
    3-token generation)."""
    shapes = jax.eval_shape(functools.partial(init_params, config, 0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def test_prompt_longer_than_max_positions_is_a_clear_error(tiny, tmp_path, capsys, monkeypatch):
    model, params = tiny
    short = TINY.replace(max_position_embeddings=64)
    loop = make_loop(Llama4ForCausalLM(short), 1, 4)
    with pytest.raises(InputError, match="prompt: 65 tokens, more than the model.s max_position"):
        prefill(loop, params, np.zeros((1, 65), np.int32), [65], jax.random.key(0), ())
    missing = tmp_path / "nope.txt"
    assert cli.main(["generate", "--preset", "tiny", "--prompt-file", str(missing)]) == 2
    assert "nope.txt" in capsys.readouterr().err
    monkeypatch.setattr(importlib.import_module("l4jax.generate_cli"), "init_params", _drawn_params)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once upon a time " * 20, encoding="utf-8")
    argv = ["generate", "--preset", "tiny", "--prompt-file", str(prompt), "--max-new-tokens", "3"]
    assert cli.main(argv) == 0


def test_hidden_output_and_head_give_the_logits(tiny):
    model, params = tiny
    tokens = jnp.asarray(RNG.integers(0, TINY.vocab_size, (1, 40)), jnp.int32)
    logits = model.apply({"params": params}, tokens)
    hidden, cache = model.apply({"params": params}, tokens, method="forward", output="hidden")
    assert cache is None
    np.testing.assert_allclose(hidden @ lm_head_weights(TINY, params), logits, atol=1e-5)
    last, _ = model.apply({"params": params}, tokens, method="forward", output="last_logits")
    np.testing.assert_allclose(last[:, 0], logits[:, -1], atol=1e-5)
