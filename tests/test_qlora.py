"""QLoRA: LoRA adapters on a frozen quantized base (`PostConfig(quantize=...)`,
`l4jax train --quantize MODE --lora-rank R`). The base keeps its `QArray` leaves; each adapted
weight is dequantized one layer at a time inside the layer scan (`l4jax.model.param`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l4jax import preset, quantize
from l4jax.errors import ConfigError
from l4jax.model import LORA, Llama4ForCausalLM, init_params
from l4jax.post.lora import LoraConfig, init_adapters, merge, scaled
from l4jax.quantization import QArray, quantized_leaves
from l4jax.train_config import PostConfig
from pipelines import ByteTokenizer

CONFIG = preset("tiny", num_hidden_layers=2, num_experts_per_tok=2)  # a dense and a MoE layer
ALL = ("attention", "shared_expert", "experts", "mlp")
TOKENS = jnp.asarray(np.arange(24).reshape(2, 12) % 250)


def _apply(params, adapters=None, lora=None):
    variables = {"params": params}
    if adapters is not None:
        variables[LORA] = scaled(adapters, lora)
    return np.asarray(jax.jit(Llama4ForCausalLM(CONFIG).apply)(variables, TOKENS))


@pytest.mark.parametrize("mode", ["int4", pytest.param("int8", marks=pytest.mark.slow)])
def test_qlora_adapters_on_a_quantized_base_and_merge(mode):
    qparams = quantize(init_params(CONFIG, jax.random.key(0)), CONFIG, mode)
    assert quantized_leaves(qparams)  # the base really is quantized
    lora = LoraConfig(4, 8.0, ALL)
    adapters = init_adapters(jax.random.key(1), CONFIG, lora)
    base = _apply(qparams)
    # zero B: the adapted weight is the dequantized weight, in fp32: the quantized model's
    # logits up to fp32 rounding (its grouped matmuls dequantize block by block instead)
    np.testing.assert_allclose(_apply(qparams, adapters, lora), base, rtol=1e-5, atol=1e-5)
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.05 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
        if p[-1].key.endswith("_b") else x,
        adapters,
    )  # fmt: skip
    adapted = _apply(qparams, adapters, lora)
    assert np.abs(adapted - base).max() > 1e-2  # the adapters do something
    merged = merge(qparams, adapters, lora)
    np.testing.assert_allclose(_apply(merged), adapted, rtol=1e-5, atol=1e-5)
    # targeted weights merge into plain arrays; untargeted quantized ones stay quantized
    moe = merged["layers"]["layer_1"]["feed_forward"]
    assert not isinstance(moe["gate_proj"], QArray)
    if mode == "int8":  # int8 also quantizes the router and the head, which LoRA leaves alone
        assert isinstance(merged["lm_head"], QArray)


def test_adapter_gradients_flow_through_frozen_quantized_experts():
    """Attention adapters only: the routed experts stay quantized in the forward pass, and the
    gradient reaches the earlier layers through the quantized grouped matmul (its custom VJP):
    the same gradients as with those weights dequantized to plain arrays."""
    qparams = quantize(init_params(CONFIG, jax.random.key(0)), CONFIG, "int4")
    dense = jax.tree.map(
        lambda w: w.astype(jnp.float32) if isinstance(w, QArray) else w,
        qparams, is_leaf=lambda x: isinstance(x, QArray),
    )  # fmt: skip
    lora = LoraConfig(4, 8.0, ("attention",))
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.05 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
        if p[-1].key.endswith("_b") else x,
        init_adapters(jax.random.key(1), CONFIG, lora),
    )  # fmt: skip

    def loss(ad, params):
        variables = {"params": params, LORA: scaled(ad, lora)}
        return jnp.mean(Llama4ForCausalLM(CONFIG).apply(variables, TOKENS) ** 2)

    got = jax.jit(jax.grad(loss))(adapters, qparams)
    want = jax.jit(jax.grad(loss))(adapters, dense)
    layer0 = got["layers"]["layer_0"]["self_attn"]["q_proj_a"]  # below the MoE layer
    assert float(jnp.abs(layer0).max()) > 0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_qlora_needs_adapters():
    with pytest.raises(ConfigError, match="--lora-rank"):
        PostConfig(quantize="int4")
    with pytest.raises(ConfigError, match="int3"):
        PostConfig(quantize="int3", lora_rank=4)


@pytest.mark.slow  # one sft train step compiled
def test_qlora_sft_step_trains_adapters_and_keeps_the_base_quantized():
    from l4jax.post import make_task
    from l4jax.post.demo import sft_rows
    from l4jax.train_config import LoggingConfig, OptimizerConfig, SampleConfig, TrainConfig
    from l4jax.train_step import Trainer
    from pipelines import to_global_array
    from pipelines.chat import ListRows
    from sharding import make_mesh

    post = PostConfig(lora_rank=4, lora_targets=ALL, quantize="int4")
    tc = TrainConfig(
        steps=1, batch_size=2, seq_len=64, task="sft", post=post,
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=0),
        logging=LoggingConfig(progress=False), sample=SampleConfig(tokens=0),
    )  # fmt: skip
    rows = ListRows(sft_rows(8), "sft")
    tok = ByteTokenizer()
    trainer = Trainer(
        CONFIG, tc, make_mesh("", devices=jax.devices()[:1]),
        lambda mesh: make_task(CONFIG, tc, tok, mesh, rows=rows),
    )  # fmt: skip
    state = trainer.init(tc.seed)
    base = trainer.task.frozen["base"]
    experts = base["layers"]["layer_1"]["feed_forward"]["gate_proj"]
    assert isinstance(experts, QArray) and experts.mode == "int4"
    before = jax.tree.map(np.asarray, state.params)
    frozen = jax.tree.map(np.asarray, base)
    it, _ = trainer.task.data()
    state, metrics = trainer.step(state, to_global_array(next(it), trainer.batch_sharding))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
    moved = {
        jax.tree_util.keystr(p): not np.array_equal(a, np.asarray(b))
        for (p, a), b in zip(
            jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(state.params)
        )
    }
    # every B trained through the dequantized base (A's gradient is 0 while B is 0)
    assert all(moved[k] for k in moved if k.endswith("_b']")) and len(moved) > 10, moved
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(trainer.task.frozen["base"])):
        np.testing.assert_array_equal(a, np.asarray(b))  # the quantized base untouched
