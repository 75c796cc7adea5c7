"""`l4jax.train_task.Task`s for sft, dpo and grpo: data, objective, trainable and frozen params.

Full fine-tuning trains every parameter (the state starts from `--init-from`, else from the
seed's random init, as pretraining does); DPO/GRPO keep a frozen copy of those initial params
as the reference. With `--lora-rank R` the trained params are the adapters alone
(`l4jax.post.lora`), the base is frozen and is also the reference (adapters off), so DPO/GRPO
need no second copy of the model. Frozen arrays are placed with the model's own shardings.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from l4jax.config import Llama4Config
from l4jax.errors import ConfigError
from l4jax.model import Llama4ForCausalLM, param_logical_axes
from l4jax.post.init_from import load_init
from l4jax.post.lora import LoraConfig, adapter_layout, init_adapters, merge
from l4jax.post.objectives import Policy, dpo_objective, grpo_objective, sft_objective
from l4jax.quantization import nbytes
from l4jax.quantization import quantize as quantize_params
from l4jax.train_config import PostConfig, TrainConfig
from l4jax.train_task import Task
from pipelines.chat import make_task_dataset, open_rows
from sharding.rules import mesh_context, param_shardings

log = logging.getLogger(__name__)


def lora_config(post: PostConfig) -> LoraConfig | None:
    if not post.lora_rank:
        return None
    return LoraConfig(post.lora_rank, post.lora_alpha, tuple(post.lora_targets))


def _copy(tree: Any) -> Any:
    """A copy in fresh buffers (the train step donates the state; a reference must survive)."""
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), tree)


def make_task(
    config: Llama4Config, tc: TrainConfig, tokenizer: Any, mesh: Mesh, rows: Any = None
) -> Task:
    """The Task of `tc.task` (sft, dpo, grpo) on `mesh`; `rows` overrides the data (a Grain
    random-access source of rows; default `--data`, else the built-in demo set)."""
    from l4jax.post import demo

    post = tc.post
    lora = lora_config(post)
    policy = Policy(config, lora)
    model = Llama4ForCausalLM(config)
    full_axes = param_logical_axes(config)
    full_shardings = param_shardings(full_axes, mesh, tc.strategy)

    def init_full(rng):
        import flax.linen as nn

        return nn.unbox(model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"])

    needs_reference = tc.task == "dpo" or (tc.task == "grpo" and post.beta_for("grpo") > 0)
    base = None
    if post.init_from:
        base = load_init(post.init_from, config, full_shardings, post.quantize)
    elif lora is not None or needs_reference:
        with mesh_context(mesh, tc.strategy):
            base = jax.jit(init_full, out_shardings=full_shardings)(jax.random.key(tc.seed))
        if post.quantize:  # QLoRA on the seed's random base (tests, demos)
            base = quantize_params(base, config, post.quantize)
    if post.quantize:
        log.info("QLoRA: frozen base quantized to %s (%.1f MB)", post.quantize, nbytes(base) / 1e6)
    if lora is None:
        init_params, param_axes = init_full, full_axes
        initial = base
        frozen = {"reference": _copy(base)} if needs_reference else {}
        model_params = None
    else:
        _, param_axes = adapter_layout(config, lora)

        def init_params(rng):
            return init_adapters(rng, config, lora)

        initial, frozen = None, {"base": base}

        def model_params(adapters):
            return merge(base, adapters, lora)

    seq_len, rows_per_step = tc.seq_len, tc.batch_size
    if tc.task == "grpo":
        if tc.batch_size % post.num_generations:
            raise ConfigError(
                f"--batch-size {tc.batch_size} is not divisible by --num-generations "
                f"{post.num_generations} (rows = prompts x generations)"
            )
        rows_per_step = tc.batch_size // post.num_generations
    if rows is None:
        rows = open_rows(tc.data.path, tc.task) if tc.data.path else demo.rows(tc.task, tc.seed)

    def data():
        ds = make_task_dataset(
            tc.task, rows, tokenizer, seq_len, rows_per_step, tc.seed,
            jax.process_index(), jax.process_count(),
        )  # fmt: skip
        return iter(ds), repr(rows)

    i32 = ((tc.batch_size, seq_len), jnp.int32)
    names = ("tokens", "segment_ids", "positions", "loss_mask")
    prepare = None
    if tc.task == "sft":
        objective = sft_objective(policy)
        spec = dict.fromkeys(names, i32)
    elif tc.task == "dpo":
        objective = dpo_objective(policy, post.beta_for("dpo"), post.label_smoothing)
        spec = {f"{k}_{n}": i32 for k in ("chosen", "rejected") for n in names}
    elif tc.task == "grpo":
        from l4jax.post.grpo import Rollouts

        beta = post.beta_for("grpo")
        objective = grpo_objective(policy, post.epsilon, beta, tc.sample.temperature)
        f32 = ((tc.batch_size, seq_len), jnp.float32)
        spec = {**dict.fromkeys(names, i32), "old_logps": f32, "advantages": f32}
        if post.routing_replay:
            n_moe, k = len(config.moe_layers), config.num_experts_per_tok
            spec["expert_ids"] = ((tc.batch_size, seq_len, n_moe, k), jnp.int32)
        prepare = Rollouts(config, tc, post, policy, tokenizer, mesh, frozen)
    else:
        raise ConfigError(f"--task {tc.task!r}: not a post-training task")
    return Task(
        tc.task, objective, spec, init_params, param_axes, frozen, initial, data, prepare,
        model_params,
    )  # fmt: skip
