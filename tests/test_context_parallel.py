"""Context parallelism (l4jax.context_parallel) on 8 simulated devices: the sequence split over
the `sequence` mesh axis gives the same attention, gradients, losses and tokens as unsplit."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from l4jax import context_parallel
from l4jax.attention import attention, self_mask
from l4jax.config import CONTEXT_PARALLEL_LAYOUTS, preset
from l4jax.decoding import decode, make_loop, prefill
from l4jax.errors import ConfigError
from l4jax.model import Llama4ForCausalLM, cache_mask, init_params
from l4jax.train import train
from l4jax.train_config import (
    CheckpointConfig,
    LoggingConfig,
    OptimizerConfig,
    SampleConfig,
    TrainConfig,
)
from sharding import make_mesh
from sharding.rules import mesh_context

TINY = preset("tiny")  # attention_chunk_size 32
# the end-to-end tests: 2 layers (one chunked RoPE + dense FFN, one global NoPE + MoE) compile
# in half the time of tiny's 4 and still hold both attention and both FFN kinds
TWO = preset("tiny", num_hidden_layers=2, no_rope_layer_interval=2)


def packed_inputs(b=2, t=128, n=4, k=2, h=16, seed=0):
    """q, k, v and packed positions / segments: documents restart at 0 mid-chunk and cross
    the shard boundaries (t / 4 = 32 tokens per shard)."""
    rng = np.random.default_rng(seed)
    q, k_, v = (jnp.asarray(rng.standard_normal((b, t, m, h)), jnp.float32) for m in (n, k, k))
    starts = [0, 21, 50, 77, 101]  # document boundaries, none on a multiple of 32
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for i, s in enumerate(starts):
        seg[:, s:] = i + 1
        pos[:, s:] = np.arange(t - s)
    seg[1] = 1  # the second row: one unpacked document
    pos[1] = np.arange(t)
    return q, k_, v, jnp.asarray(pos), jnp.asarray(seg)


def cp_for(mesh_spec: str, exchange: str = "ring", layout: str = "contiguous"):
    mesh = make_mesh(mesh_spec)
    with mesh_context(mesh):
        cp = context_parallel.for_mesh(exchange, layout)
    return mesh, cp


@pytest.mark.parametrize(
    "chunk, impl",
    [(32, "xla"), (32, "blockwise"), (None, "xla"), (None, "blockwise"), (None, "splash")],
)
def test_sharded_attention_and_gradients_equal_unsharded(chunk, impl):
    """`splash` (Pallas interpreter here): the ring's steps run JAX's kernel, its logsumexp
    merged across shards, against the einsum oracle on the whole sequence. Global layers also
    in zig-zag order (documents cross its 8 pieces of 16 tokens too)."""
    q, k, v, pos, seg = packed_inputs()

    def loss(fn, q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * jnp.cos(out)), out

    oracle = "xla" if impl == "splash" else impl

    def whole(q, k, v):
        return attention(oracle, q, k, v, self_mask(pos, seg, chunk))[0]

    (want, want_out), want_g = jax.value_and_grad(
        lambda *a: loss(whole, *a), argnums=(0, 1, 2), has_aux=True
    )(q, k, v)
    variants = [("ring", "contiguous")]
    if chunk is None:
        variants.append(("ring", "zigzag"))
    if chunk is None and impl != "splash":
        variants.append(("all_gather", "contiguous"))
    for exchange, layout in variants:
        mesh, cp = cp_for("data=2,sequence=4", exchange, layout)
        assert cp.seq_axes == ("sequence",) and cp.shards == 4

        def split(q, k, v, cp=cp):
            return cp.self_attention(impl, q, k, v, pos, seg, chunk)

        with mesh_context(mesh):
            (got, got_out), got_g = jax.jit(
                jax.value_and_grad(lambda *a: loss(split, *a), argnums=(0, 1, 2), has_aux=True)
            )(q, k, v)
        np.testing.assert_allclose(got_out, want_out, atol=2e-6, rtol=2e-5)
        np.testing.assert_allclose(got, want, rtol=2e-5)  # a sum of every output: their rtol
        for g, w in zip(got_g, want_g):
            np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-4)


def test_ring_gradient_holds_two_kv_shards_not_the_whole_sequence():
    """The ring's own backward pass passes K/V (and dK/dV) round again instead of keeping every
    block that went by: per device (XLA's compiled memory analysis, 8 shards of 1024 tokens),
    its gradient takes under 0.6x the all-gather's (autodiff of the forward ring took more than
    the all-gather's)."""
    t = 8192
    mesh = make_mesh("sequence=8")
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    seg = jnp.ones_like(pos)
    split = NamedSharding(mesh, PartitionSpec(None, "sequence"))
    qkv = [jax.ShapeDtypeStruct((1, t, m, 32), jnp.float32, sharding=split) for m in (4, 4, 4)]
    used = {}
    for exchange in ("ring", "all_gather"):
        cp = context_parallel.ContextParallel(mesh.abstract_mesh, ("sequence",), exchange=exchange)

        def loss(q, k, v, cp=cp):
            return jnp.sum(cp.self_attention("auto", q, k, v, pos, seg, None))

        with mesh_context(mesh):
            grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*qkv).compile()
        mem = grad.memory_analysis()
        used[exchange] = mem.argument_size_in_bytes + mem.temp_size_in_bytes
    assert used["ring"] < 0.6 * used["all_gather"], used


def test_chunked_layers_without_packing_need_only_the_local_shard():
    """Unpacked rows: each shard's attention over its own keys alone is already the answer
    (the halo is fully masked), and a chunked layer moves no K/V but the one-chunk halo."""
    q, k, v, _, _ = packed_inputs()
    pos = jnp.broadcast_to(jnp.arange(128, dtype=jnp.int32), (2, 128))
    seg = jnp.ones_like(pos)
    want = attention("xla", q, k, v, self_mask(pos, seg, 32))[0]
    local = [
        attention("xla", *(x[:, i : i + 32] for x in (q, k, v)), self_mask(pos[:, i : i + 32], seg[:, i : i + 32], 32))[0]  # noqa: E501
        for i in range(0, 128, 32)
    ]  # fmt: skip
    np.testing.assert_allclose(jnp.concatenate(local, axis=1), want, atol=1e-6)
    mesh, cp = cp_for("data=2,sequence=4")
    with mesh_context(mesh):
        hlo = (
            jax.jit(lambda q, k, v: cp.self_attention("xla", q, k, v, pos, seg, 32))
            .lower(q, k, v)
            .compile()
            .as_text()
        )
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    # the halo: one chunk of k, v, positions, segments from the previous shard
    assert hlo.count("collective-permute-start") + hlo.count("collective-permute(") <= 8


def test_bad_lengths_are_config_errors_naming_both_numbers():
    mesh, cp = cp_for("data=2,sequence=4")
    q, k, v, pos, seg = packed_inputs(t=96)  # 96 / 4 = 24 tokens per shard, chunk 32
    with mesh_context(mesh), pytest.raises(ConfigError, match="shards of 24 tokens .* 32"):
        cp.self_attention("xla", q, k, v, pos, seg, 32)
    q, k, v, pos, seg = packed_inputs(t=90)
    with mesh_context(mesh), pytest.raises(ConfigError, match="length 90 .* 4 shards"):
        cp.self_attention("xla", q, k, v, pos, seg, None)
    with pytest.raises(ConfigError, match="exchange"):
        context_parallel.ContextParallel.from_rules(mesh, (), "ulysses")
    with pytest.raises(ConfigError, match="layout"):
        context_parallel.ContextParallel.from_rules(mesh, (), "ring", "striped")
    mesh, cp = cp_for("data=2,sequence=4", layout="zigzag")
    q, k, v, pos, seg = packed_inputs(t=100)  # 4 shards of 25, but not 8 pieces
    with mesh_context(mesh), pytest.raises(ConfigError, match="length 100 into 8 pieces"):
        cp.self_attention("xla", q, k, v, pos, seg, None)
    # the lengths every layer accepts (what `l4jax generate --mesh` pads prompts to)
    contiguous = cp_for("data=2,sequence=4")[1]
    assert [contiguous.length_multiple(c) for c in (32, None)] == [128, 4]
    assert [cp.length_multiple(c) for c in (32, None)] == [128, 8]
    for c in (32, None):
        cp.check_length(cp.length_multiple(c), c)
        contiguous.check_length(contiguous.length_multiple(c), c)
    # a prompt prefilled in one piece must split too (only a first piece of several may not)
    model, params = Llama4ForCausalLM(TWO), init_params(TWO, 0)
    loop = make_loop(model, 2, 2)
    with mesh_context(mesh), pytest.raises(ConfigError, match="shards of 24 tokens .* 32"):
        prefill(loop, params, np.ones((2, 96), np.int32), np.array([96, 90]), jax.random.key(0), ())


def test_zigzag_order_balances_the_causal_ring():
    """Block pairs each shard computes at each ring step (the blockwise plan's own count):
    in contiguous order the last shard works at every step and the first at one; in zig-zag
    order all shards do the same work at every step, and the critical path (the slowest shard
    per step, summed) is close to half."""
    order = context_parallel.zigzag_order(16, 4)
    assert order.tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    mesh = make_mesh("data=2,sequence=4")  # the ring's own moves give that order, and undo it
    spec = PartitionSpec(None, "sequence")

    def moved(f):
        return jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec)

    there = moved(lambda x: context_parallel.to_zigzag(x, ("sequence",), 4))
    back = moved(lambda x: context_parallel.from_zigzag(x, ("sequence",), 4))
    tokens = jnp.arange(16, dtype=jnp.int32)[None]
    np.testing.assert_array_equal(there(tokens)[0], order)
    np.testing.assert_array_equal(back(there(tokens)), tokens)
    work = {
        layout: context_parallel.ring_work(8192, 8, layout, block_q=128, block_k=128)
        for layout in CONTEXT_PARALLEL_LAYOUTS
    }
    contiguous, zigzag = work["contiguous"], work["zigzag"]  # [step, shard] block pairs
    assert contiguous.sum() == zigzag.sum()  # the same attention, moved about
    assert (contiguous[1:, 0] == 0).all() and (contiguous[:, -1] > 0).all()
    assert (zigzag[1:] == zigzag[1:, :1]).all()  # every shard alike at every later step
    ratio = zigzag.max(axis=1).sum() / contiguous.max(axis=1).sum()
    assert 0.5 <= ratio < 0.6, ratio


@pytest.mark.parametrize("t", [1, 6])  # a decode step; a prefill piece
def test_flash_decoding_over_cache_shards_equals_whole_cache(t):
    rng = np.random.default_rng(3)
    b, s = 2, 64
    q = jnp.asarray(rng.standard_normal((b, t, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, s, 2, 16)), jnp.float32) for _ in range(2))
    # the piece at indices 40.. over the 40 slots held; row 1 left padded by 31: it sees only
    # shard 0's slots 31..39 (shards 1-3 have no key for it: their logsumexp is -inf)
    pos = jnp.asarray([[40], [9]], jnp.int32) + jnp.arange(t, dtype=jnp.int32)
    mask = cache_mask(s, jnp.int32(40 + (t == 1)), jnp.int32(40), pos, None)
    want = attention("xla", q, k, v, mask, need_lse=True)
    mesh, cp = cp_for("data=2,sequence=4")
    with mesh_context(mesh):
        got = jax.jit(lambda q, k, v: cp.cache_attention("xla", q, k, v, mask))(q, k, v)
        assert cp.cache_attention("xla", q, k[:, :63], v[:, :63], mask) is None
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


@pytest.fixture
def sharded(traced_lengths):
    """The sequence lengths of the layers whose attention ran context-parallel."""
    return traced_lengths("self_attention")


@pytest.fixture
def flash(traced_lengths):
    """The query lengths of the attentions that read a sequence-sharded cache by
    flash-decoding."""
    return traced_lengths("cache_attention")


@pytest.mark.slow
@pytest.mark.parametrize("piece, kv_cache_dtype", [(None, None), (32, None), (32, "int8")])
def test_sharded_prefill_and_decode_give_the_same_tokens(sharded, flash, piece, kv_cache_dtype):
    """The default prefill on a sequence mesh: the whole prompt through the ring; with
    `prefill_chunk` 32, pieces that read the sharded cache by flash-decoding (also from an
    int8 cache). Either way the tokens and logits of one device."""
    model, params = Llama4ForCausalLM(TWO), init_params(TWO, 0)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, TWO.vocab_size, (2, 128))  # 4 shards of one chunk each
    lengths = np.array([128, 100])  # row 1 left padded by 28
    new = 5  # cache of 128 + 5 - 1 = 132 slots: 4 shards of 33 for flash-decoding
    # the default pieces: 4 of one chunk each unsharded; the whole prompt on the sequence mesh
    loop = make_loop(
        model, 2, new, prefill_chunk=piece, return_logits=True, kv_cache_dtype=kv_cache_dtype
    )  # greedy

    def run():
        state = prefill(loop, params, prompts, lengths, jax.random.key(0), ())
        return decode(loop, params, state, lengths, jax.random.key(1), ())

    want = run()
    assert not sharded
    mesh = make_mesh("data=2,sequence=4")
    with mesh_context(mesh):
        got = run()
    if piece is None:
        assert sharded and set(sharded) == {128}, sharded  # the whole prompt went through
    else:  # the first piece (no cache yet) through the ring in the global layer; the later
        # pieces and the decode steps by flash-decoding
        assert set(sharded) == {32} and set(flash) == {32, 1}, (sharded, flash)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logits, want.logits, atol=2e-5)
    # the global layer's cache (slot 1) is split over rows (data) and length (sequence): each
    # device holds 1/8 of it; the chunked layers' rings only over rows (int8: the scales too)
    for slot, per_device in (("layer_1", 8), ("layer_0", 2)):
        for k in jax.tree.leaves(got.cache[slot]["k"]):
            assert {s.data.nbytes for s in k.addressable_shards} == {k.nbytes // per_device}


@pytest.mark.slow
def test_sequence_parallel_training_losses_equal_fsdp(tmp_path):
    """`--mesh data=2,sequence=4` trains like `--mesh data=2,fsdp=4`, the global layer in
    contiguous and in zig-zag order: packed rows of 256 tokens (4 shards of 64 = 2 chunks each;
    documents cross chunk and shard boundaries)."""
    losses = {}
    runs = [("data=2,fsdp=4", "contiguous")]
    runs += [("data=2,sequence=4", layout) for layout in ("contiguous", "zigzag")]
    for spec, layout in runs:
        tc = TrainConfig(
            steps=2, batch_size=8, seq_len=256, optimizer=OptimizerConfig(warmup_steps=1),
            checkpoint=CheckpointConfig(str(tmp_path / spec / layout), save_every=100),
            logging=LoggingConfig(100, progress=False), sample=SampleConfig(tokens=0),
        )  # fmt: skip
        model = TWO.replace(context_parallel_layout=layout)
        losses[spec, layout] = train(model, tc, mesh=make_mesh(spec), sample=False).losses
    want = losses[runs[0]]
    for run in runs[1:]:
        got = losses[run]
        assert sorted(want) == sorted(got) == [1, 2], run
        np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=2e-5)


def test_batch_sharding_splits_the_length_over_sequence():
    mesh = make_mesh("data=2,sequence=4")
    with mesh_context(mesh):
        spec = NamedSharding(mesh, PartitionSpec("data", "sequence"))
        assert context_parallel.for_mesh().batch_axes == ("data",)
    assert spec.num_devices == 8


def test_train_flag_sets_the_layout():
    """`l4jax train --context-parallel-layout zigzag` reaches the model config (the losses in
    that order: test_sequence_parallel_training_losses_equal_fsdp); a bad value exits 2."""
    from l4jax.cli import build_parser
    from l4jax.train_cli import model_config_from_args

    parser = build_parser()
    args = parser.parse_args(["train", "--preset", "tiny", "--context-parallel-layout", "zigzag"])
    assert model_config_from_args(args).context_parallel_layout == "zigzag"
    assert model_config_from_args(parser.parse_args(["train"])).context_parallel_layout == (
        "contiguous"
    )
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["train", "--context-parallel-layout", "striped"])
    assert exit_.value.code == 2


@pytest.mark.slow
def test_generate_and_chat_cli_on_a_sequence_mesh_give_the_same_text(
    capsys, monkeypatch, sharded, flash
):
    """`l4jax generate --mesh data=2,sequence=4`: the params placed on the mesh, the prompt
    left-padded to whole chunks per shard and prefilled through the ring; greedy text equal to
    one device's; `l4jax chat --mesh` likewise, turn by turn (images on a mesh:
    tests/test_vision.py)."""
    from l4jax import cli

    mesh = ["--mesh", "data=2,sequence=4"]
    common = ["--preset", "tiny", "--temperature", "0", "--max-new-tokens", "5"]
    args = ["generate", *common, "--prompt", "The quick brown fox " * 6]
    assert cli.main(args) == 0
    want = capsys.readouterr().out
    assert not sharded
    assert cli.main([*args, *mesh]) == 0
    got = capsys.readouterr().out
    assert sharded and all(t % (4 * TINY.attention_chunk_size) == 0 for t in sharded), sharded
    assert got == want and want.strip()

    turns = "Name three colours.\n/image photo.jpg\nAnd three more?\n"
    outputs = []
    for extra in ([], mesh):  # ("/image": the tiny preset has no vision tower; exit 2)
        monkeypatch.setattr("sys.stdin", io.StringIO(turns))
        sharded.clear(), flash.clear()
        jax.clear_caches()  # (so that prefill and decode trace again: the counts see them)
        assert cli.main(["chat", *common, *extra]) == 2
        outputs.append(capsys.readouterr())
        assert bool(sharded) == bool(flash) == bool(extra), (sharded, flash)
    assert outputs[1].out == outputs[0].out and outputs[0].out.count("assistant> ") == 2
    assert all("images need a multimodal checkpoint" in o.err for o in outputs)
