"""Post-training: chat rendering and the SFT mask, SFT/DPO/GRPO objectives against hand-written
references, LoRA, routing replay and GRPO learning (the command line and kill -9 resume are in
tests/test_post_cli.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l4jax import preset
from l4jax.model import Llama4ForCausalLM, init_params
from l4jax.post.objectives import Policy, logps_from_logits, sft_objective
from pipelines import ByteTokenizer
from pipelines.chat import render_chat

TINY = preset("tiny")
TINY2 = preset("tiny", num_hidden_layers=2)  # one dense + one MoE layer: short compiles
TOK = ByteTokenizer()
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Reverse: abc"},
    {"role": "assistant", "content": "cba"},
    {"role": "user", "content": "Add: 2+3"},
    {"role": "assistant", "content": "5"},
]
OTHER = [
    {"role": "user", "content": "Upper: ab"},
    {"role": "assistant", "content": "AB"},
]


def _row(ids, mask, length, segment=1, offset=0, row=None):
    row = row or {
        k: np.zeros(length, np.int32) for k in ("tokens", "segment_ids", "positions", "loss_mask")
    }
    n = len(ids)
    row["tokens"][offset : offset + n] = ids
    row["segment_ids"][offset : offset + n] = segment
    row["positions"][offset : offset + n] = np.arange(n)
    row["loss_mask"][offset : offset + n] = mask
    return row


def _batch(*rows):
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


# ---- rendering ---------------------------------------------------------------------------


def test_render_matches_the_llama4_tokenizer_and_the_mask_lines_up():
    from l4jax.tokenizer import Message, Tokenizer

    tok = Tokenizer.default()
    ids, mask = render_chat(tok, CHAT)
    want = [tok.bos_id]
    for m in CHAT:
        want += tok.encode_message(Message(m["role"], m["content"]))
    assert ids == want  # the rendering is Meta's chat format, token for token
    # re-tokenize: each run of masked ids is exactly an assistant reply and its <|eot|>
    runs, current = [], []
    for token, on in zip(ids, mask, strict=True):
        if on:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    replies = [m["content"] for m in CHAT if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == [f"{r}<|eot|>" for r in replies]
    prompt, _ = render_chat(tok, CHAT[:2], open_assistant=True)
    assert prompt == tok.encode_dialog_prompt([Message(m["role"], m["content"]) for m in CHAT[:2]])


def test_byte_presets_render_chats_with_llama4_special_tokens():
    ids, mask = render_chat(TOK, CHAT)
    assert ids[0] == TOK.special_tokens["<|begin_of_text|>"]
    assert ids.count(TOK.special_tokens["<|header_start|>"]) == len(CHAT)
    assert ids.count(TOK.special_tokens["<|eot|>"]) == len(CHAT)
    masked = [i for i, m in zip(ids, mask, strict=True) if m]
    assert masked == [*b"cba", TOK.eot_id, *b"5", TOK.eot_id]
    assert max(ids) < TINY.vocab_size


# ---- SFT ----------------------------------------------------------------------------------


@jax.jit
def _sft_loss_jit(params, batch):
    objective = sft_objective(Policy(TINY))
    return objective.loss(params, {}, batch, objective.denominator(batch))[0]


def _sft_loss(params, batch):
    return float(_sft_loss_jit(params, batch))


@pytest.fixture(scope="module")
def params():
    return init_params(TINY, 0)


def test_sft_loss_is_the_mean_over_assistant_tokens(params):
    ids, mask = render_chat(TOK, CHAT)
    batch = _batch(_row(ids, mask, 160), _row([], [], 160))
    apply = jax.jit(Llama4ForCausalLM(TINY).apply)
    logits = np.asarray(apply({"params": params}, batch["tokens"]))[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    # by hand: predict token t+1 at t wherever token t+1 is assistant content or its <|eot|>
    terms = [-logp[t, ids[t + 1]] for t in range(len(ids) - 1) if mask[t + 1]]
    assert len(terms) == 3 + 1 + 1 + 1
    np.testing.assert_allclose(_sft_loss(params, batch), np.mean(terms), rtol=1e-5)


def test_user_system_and_header_tokens_carry_no_gradient():
    ids, mask = render_chat(TOK, CHAT)
    batch = _batch(_row(ids, mask, 160))
    logits = jax.random.normal(jax.random.key(0), (1, 160, TINY.vocab_size))

    def loss(logits):
        logp, w = logps_from_logits(logits, batch)
        return -jnp.sum(logp * w) / jnp.sum(w)

    grad = np.abs(np.asarray(jax.grad(loss)(logits))[0]).sum(-1)
    trained = np.array([bool(mask[t + 1]) if t + 1 < len(ids) else False for t in range(160)])
    assert np.all(grad[~trained] == 0)  # exactly zero: prompts, headers, padding
    assert np.all(grad[trained] > 0)


def test_packed_and_unpacked_batches_give_the_same_loss(params):
    a, b = render_chat(TOK, CHAT), render_chat(TOK, OTHER)
    unpacked = _batch(_row(*a, 160), _row(*b, 160))
    packed_row = _row(*a, 160)
    _row(*b, 160, segment=2, offset=len(a[0]), row=packed_row)
    packed = _batch(packed_row, _row([], [], 160))
    np.testing.assert_allclose(_sft_loss(params, packed), _sft_loss(params, unpacked), rtol=1e-6)


def test_sft_pipeline_packs_whole_chats_keeping_masks_and_segments():
    from l4jax.post.demo import rows
    from pipelines.chat import make_task_dataset

    batch = next(iter(make_task_dataset("sft", rows("sft"), TOK, 256, 4, prefetch=0)))
    assert batch["tokens"].shape == batch["loss_mask"].shape == (4, 256)
    for r in range(4):
        seg = batch["segment_ids"][r]
        for s in set(seg.tolist()) - {0}:
            ids = batch["tokens"][r][seg == s].tolist()
            assert ids[0] == TOK.bos_id  # whole chats: every segment starts at its beginning
            want_ids, want_mask = render_chat(TOK, _decode_chat(ids))
            assert ids == want_ids[: len(ids)]
            np.testing.assert_array_equal(batch["loss_mask"][r][seg == s], want_mask[: len(ids)])
            assert batch["positions"][r][seg == s].tolist() == list(range(len(ids)))


def _decode_chat(ids):
    """Messages back from byte-tokenizer ids (the inverse of `render_chat`)."""
    messages, i = [], 1
    while i < len(ids):
        assert ids[i] == TOK.header_start_id
        end = ids.index(TOK.header_end_id, i)
        role = bytes(ids[i + 1 : end]).decode()
        stop = min(j for j in range(end, len(ids)) if ids[j] in (TOK.eot_id, TOK.eom_id))
        messages.append({"role": role, "content": bytes(ids[end + 3 : stop]).decode()})
        i = stop + 1
    return messages


# ---- DPO ----------------------------------------------------------------------------------


def _trl_sigmoid_dpo(pc, pr, rc, rr, beta, ls):
    """TRL's DPOTrainer `sigmoid` loss, written out from its source (trl is not installed)."""
    logits = (pc - pr) - (rc - rr)
    logsigmoid = lambda x: -np.logaddexp(0, -x)  # noqa: E731
    losses = -logsigmoid(beta * logits) * (1 - ls) - logsigmoid(-beta * logits) * ls
    return losses, beta * (pc - rc), beta * (pr - rr)


@pytest.mark.parametrize("beta,ls", [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_loss_matches_trls_formula(beta, ls):
    from l4jax.post.objectives import dpo_loss

    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-20, 5, 16).astype(np.float32) for _ in range(4))
    got = dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta, ls)
    want = _trl_sigmoid_dpo(*(x.astype(np.float64) for x in (pc, pr, rc, rr)), beta, ls)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-6)
    same = dpo_loss(*map(jnp.asarray, (pc, pr, pc, pr)), beta, ls)[0]
    np.testing.assert_array_equal(np.asarray(same), np.float32(math.log(2)))


@pytest.mark.slow
def test_dpo_starts_at_log2_and_learns_held_out_preferences(tmp_path):
    from l4jax.post import PostConfig, make_task
    from l4jax.post.demo import dpo_rows
    from l4jax.train_config import LoggingConfig, OptimizerConfig, SampleConfig, TrainConfig
    from l4jax.train_step import Trainer
    from pipelines.chat import ListRows, make_task_dataset
    from sharding import make_mesh

    tc = TrainConfig(
        steps=40, batch_size=8, seq_len=48,
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=2), task="dpo",
        post=PostConfig(beta=0.1), logging=LoggingConfig(progress=False),
        sample=SampleConfig(tokens=0),
    )  # fmt: skip
    train_rows = ListRows(dpo_rows(256, seed=0), "train")
    held_out = ListRows(dpo_rows(64, seed=99), "held out")
    trainer = Trainer(
        TINY, tc, make_mesh("fsdp=8"),
        lambda mesh: make_task(TINY, tc, TOK, mesh, rows=train_rows),
    )  # fmt: skip
    state = trainer.init(tc.seed)
    it, _ = trainer.task.data()
    losses = []
    from pipelines import to_global_array

    for _ in range(tc.steps):
        state, m = trainer.step(state, to_global_array(next(it), trainer.batch_sharding))
        losses.append(float(m["loss"]))
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    objective = trainer.task.objective
    batch = next(iter(make_task_dataset("dpo", held_out, TOK, 48, 64, prefetch=0)))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    _, metrics = jax.jit(objective.loss)(state.params, trainer.task.frozen, batch, 64.0)
    assert float(metrics["reward_accuracy"]) > 0.9, metrics
    assert float(metrics["reward_margin"]) > 0


# ---- LoRA ---------------------------------------------------------------------------------


def _lora_logits(params, adapters, lora, config=TINY):
    from l4jax.post.lora import apply_variables

    tokens = jnp.asarray(np.arange(24).reshape(2, 12) % 250)
    return jax.jit(Llama4ForCausalLM(config).apply)(apply_variables(params, adapters, lora), tokens)


ALL = ("attention", "shared_expert", "experts", "mlp")


def test_lora_zero_adapters_give_the_base_logits_and_merged_gives_the_adapter_model(params):
    from l4jax.post.lora import LoraConfig, init_adapters, merge

    lora = LoraConfig(4, 8.0, ALL)
    adapters = init_adapters(jax.random.key(0), TINY, lora)
    tokens = jnp.asarray(np.arange(24).reshape(2, 12) % 250)
    base = jax.jit(Llama4ForCausalLM(TINY).apply)({"params": params}, tokens)
    np.testing.assert_array_equal(
        np.asarray(_lora_logits(params, adapters, lora)), np.asarray(base)
    )
    # trained-looking adapters: every B random
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.05 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
        if p[-1].key.endswith("_b") else x,
        adapters,
    )  # fmt: skip
    with_adapters = np.asarray(_lora_logits(params, adapters, lora))
    merged = jax.jit(Llama4ForCausalLM(TINY).apply)(
        {"params": merge(params, adapters, lora)}, tokens
    )
    assert np.abs(with_adapters - np.asarray(base)).max() > 1e-2  # the adapters do something
    np.testing.assert_allclose(np.asarray(merged), with_adapters, rtol=1e-5, atol=1e-5)
    # per-expert adapters: one (A, B) per routed expert of each MoE layer
    moe = adapters["layers"]["layer_1"]["feed_forward"]
    groups = TINY.num_hidden_layers // TINY.scan_period
    assert moe["gate_proj_a"].shape[:2] == (groups, TINY.num_local_experts)


def _lora_step(mesh_spec, steps=2):
    from l4jax.post import PostConfig, make_task
    from l4jax.post.demo import sft_rows
    from l4jax.train_config import LoggingConfig, OptimizerConfig, SampleConfig, TrainConfig
    from l4jax.train_step import Trainer
    from pipelines import to_global_array
    from pipelines.chat import ListRows
    from sharding import make_mesh

    tc = TrainConfig(
        steps=steps, batch_size=8, seq_len=64,
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=0), task="sft",
        post=PostConfig(lora_rank=4, lora_targets=ALL), logging=LoggingConfig(progress=False),
        sample=SampleConfig(tokens=0),
    )  # fmt: skip
    devices = jax.devices() if mesh_spec else jax.devices()[:1]
    rows = ListRows(sft_rows(64), "sft")
    trainer = Trainer(
        TINY2, tc, make_mesh(mesh_spec, devices=devices),
        lambda mesh: make_task(TINY2, tc, TOK, mesh, rows=rows),
    )  # fmt: skip
    state = trainer.init(tc.seed)
    first = jax.tree.map(np.asarray, state.params)
    base = jax.tree.map(np.asarray, trainer.task.frozen["base"])
    it, _ = trainer.task.data()
    metrics = []
    for _ in range(steps):
        state, m = trainer.step(state, to_global_array(next(it), trainer.batch_sharding))
        metrics.append(float(m["loss"]))
    return trainer, first, base, state, metrics


@pytest.mark.slow  # two train steps compiled (or generation + a train step)
def test_lora_trains_only_adapters_and_sharded_equals_unsharded():
    from l4jax.model import param_logical_axes

    one, first, base, state1, loss1 = _lora_step("")
    eight, _, _, state8, loss8 = _lora_step("fsdp=4,expert=2")
    # optimizer state and trained params: adapters only; the base is untouched
    assert set(jax.tree.leaves(jax.tree.map(lambda x: x.shape, state1.params))) != set()
    assert all(k.endswith(("_a", "_b")) for k in _leaf_names(state1.params))
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(eight.task.frozen["base"])):
        np.testing.assert_array_equal(a, np.asarray(b))
    for before, after in zip(jax.tree.leaves(first), jax.tree.leaves(state1.params)):
        assert not np.array_equal(before, np.asarray(after))  # every adapter leaf moved
    # 8 devices == 1 device
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state8.params), jax.tree.leaves(state1.params)):
        # other reduction orders, through Adam's normalisation of tiny gradients: ~1e-5 abs
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=3e-5)
    # adapters shard with their weights: the expert axis of routed-expert adapters on `expert`
    a = state8.params["layers"]["layer_1"]["feed_forward"]["gate_proj_a"]
    w_spec = eight.param_shardings["layers"]["layer_1"]["feed_forward"]["gate_proj_a"].spec
    assert w_spec[1] == "expert" and a.sharding.spec[1] == "expert"
    del param_logical_axes


def _leaf_names(tree):
    return [p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


# ---- GRPO ---------------------------------------------------------------------------------


def test_grpo_advantages_and_clipped_objective_match_numpy():
    from l4jax.post.grpo import group_advantages
    from l4jax.post.objectives import grpo_token_loss

    rewards = np.array([[1.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2], [3.0, 1.0, 2.0, 0.0]])
    adv = group_advantages(rewards)
    for g in range(3):
        r = rewards[g]
        want = (r - r.sum() / 4) / (np.sqrt(((r - r.mean()) ** 2).sum() / 3) + 1e-4)
        np.testing.assert_allclose(adv[g], want, rtol=1e-12)
    assert np.all(adv[1] == 0)  # equal rewards: zero advantage (dynamic filtering drops it)

    rng = np.random.default_rng(0)
    logp = rng.normal(-2, 0.5, (4, 6)).astype(np.float32)
    old = logp + rng.normal(0, 0.3, (4, 6)).astype(np.float32)
    ref = logp + rng.normal(0, 0.3, (4, 6)).astype(np.float32)
    a = np.repeat(rng.normal(0, 1, (4, 1)), 6, axis=1).astype(np.float32)
    eps, beta = 0.2, 0.04
    got, kl, clipped = grpo_token_loss(*map(jnp.asarray, (logp, old, ref, a)), eps, beta)
    x = logp.astype(np.float64)
    ratio = np.exp(x - old)
    surrogate = np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a)
    want_kl = np.exp(ref - x) - (ref - x) - 1
    np.testing.assert_allclose(np.asarray(got), -surrogate + beta * want_kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(kl), want_kl, rtol=1e-5, atol=1e-6)
    assert np.asarray(clipped).any() and not np.asarray(clipped).all()


def _grpo_trainer(post, steps=1, lr=3e-3, config=TINY, batch_size=32):
    from l4jax.post import make_task
    from l4jax.post.demo import grpo_rows
    from l4jax.train_config import LoggingConfig, OptimizerConfig, SampleConfig, TrainConfig
    from l4jax.train_step import Trainer
    from pipelines.chat import ListRows
    from sharding import make_mesh

    tc = TrainConfig(
        steps=steps, batch_size=batch_size, seq_len=32,
        optimizer=OptimizerConfig(learning_rate=lr, warmup_steps=0), task="grpo", post=post,
        logging=LoggingConfig(progress=False), sample=SampleConfig(tokens=0, temperature=1.0),
    )  # fmt: skip
    rows = ListRows(grpo_rows(128), "grpo")
    mesh = make_mesh("", devices=jax.devices()[:1])
    return Trainer(config, tc, mesh, lambda mesh: make_task(config, tc, TOK, mesh, rows=rows))


@pytest.mark.slow  # two train steps compiled (or generation + a train step)
def test_routing_replay_gives_the_rollout_log_probs_at_step_0():
    from l4jax.post import PostConfig
    from l4jax.post.objectives import token_logps

    post = PostConfig(
        num_generations=4, max_new_tokens=6, routing_replay=True, dynamic_filtering=False
    )  # a random model scores 0 everywhere: keep the groups filtering would drop
    trainer = _grpo_trainer(post, config=TINY2)
    state = trainer.init(0)
    it, _ = trainer.task.data()
    batch, host = trainer.task.prepare(state, next(it))
    n_moe = len(TINY2.moe_layers)
    assert batch["expert_ids"].shape == (32, 32, n_moe, TINY2.num_experts_per_tok)
    policy = trainer.task.prepare.policy

    @jax.jit
    def learner(params, b):
        return token_logps(TINY2, policy.variables(params, {}), b)

    logp, w = learner(state.params, batch)
    w = np.asarray(w) > 0
    assert w.sum() > 0
    np.testing.assert_allclose(np.asarray(logp)[w], np.asarray(batch["old_logps"])[w], atol=1e-5)
    # the replayed experts are really used: other experts give other log-probs
    other = dict(batch, expert_ids=(batch["expert_ids"] + 1) % TINY2.num_local_experts)
    moved = np.abs(np.asarray(learner(state.params, other)[0])[w] - np.asarray(logp)[w]).max()
    assert moved > 1e-3
    # and a train step runs on the batch: ratio 1 at step 0, nothing clipped
    _, metrics = trainer.step(state, batch)
    assert float(metrics["clip_fraction"]) == 0.0
    assert {"reward_mean", "reward_std", "filtered_fraction"} <= set(host)


@pytest.mark.slow
def test_grpo_mean_reward_rises_on_the_reversal_task():
    from l4jax.post import PostConfig

    steps = 60
    post = PostConfig(num_generations=8, max_new_tokens=4, beta=0.0)
    trainer = _grpo_trainer(post, lr=1e-2, batch_size=64)
    state = trainer.init(0)
    it, _ = trainer.task.data()
    rewards = []
    for _ in range(steps):
        batch, host = trainer.task.prepare(state, next(it))
        state, _ = trainer.step(state, batch)
        rewards.append(host["reward_mean"])
    first, last = np.mean(rewards[:10]), np.mean(rewards[-10:])
    print("GRPO reward curve:", [round(r, 3) for r in rewards])
    assert last > first + 0.05, rewards
