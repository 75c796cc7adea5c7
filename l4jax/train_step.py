"""The train step: state, optimizer, loss, one jitted sharded step, and `Trainer` around it.

- the mesh comes from a short spec (`sharding.make_mesh("data=2,fsdp=2,expert=2")`), logical
  axis rules (`sharding.rules`) decide how every parameter, optimizer buffer and batch is
  sharded, and the state is created directly sharded (`jax.jit(init, out_shardings=...)`);
- the train step is one `jax.jit` with explicit in/out shardings and the state donated:
  cross-entropy over packed rows (no prediction across segment boundaries, padding masked),
  optional router z-loss / load-balance loss (off by default, as in the references), gradient
  accumulation over micro-batches, global-norm clipping and AdamW with a warmup-cosine schedule;
  compute runs in `config.dtype` over `config.param_dtype` master weights, rematerialised by
  `config.remat_policy`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from l4jax.config import Llama4Config
from l4jax.errors import ConfigError
from l4jax.losses import cross_entropy_sum
from l4jax.model import Llama4ForCausalLM, lm_head_weights, param_logical_axes
from l4jax.train_config import TrainConfig
from l4jax.train_task import Batch, Objective, Task
from pipelines.packing import next_token_targets
from sharding.mesh import make_mesh
from sharding.rules import (
    batch_sharding,
    mesh_context,
    optimizer_shardings,
    param_shardings,
    replicated,
)


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # [] int32, optimizer steps taken
    params: Any
    opt_state: Any


# ---- optimizer ---------------------------------------------------------------------------------


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then cosine decay to `learning_rate * min_lr_ratio`."""
    opt = tc.optimizer
    warmup = min(opt.warmup_steps, max(tc.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(tc.steps, warmup + 1),
        end_value=opt.learning_rate * opt.min_lr_ratio,
    )


def _decay_mask(params: Any) -> Any:
    """Weight decay on weight matrices, not on norm scales."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) != "scale", params
    )


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay) on the warmup-cosine schedule."""
    opt = tc.optimizer
    return optax.chain(
        optax.clip_by_global_norm(opt.clip_norm),
        optax.adamw(
            lr_schedule(tc),
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=_decay_mask,
        ),
    )


# ---- loss ----------------------------------------------------------------------------------------


def _collect(tree: Any, name: str) -> list[jax.Array]:
    """Every sown value called `name` (one tuple entry per sow), in tree order."""
    found = []

    def visit(path, leaf):
        if any(getattr(k, "key", None) == name for k in path):
            found.append(leaf)

    jax.tree_util.tree_map_with_path(visit, tree)
    return found


def loss_terms(
    config: Llama4Config, params: Any, batch: Batch, with_router_losses: bool = False
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], jax.Array]:
    """(sum of token cross-entropies, number of target tokens, router losses, router load).

    Router load is [moe layers, E] tokens per expert; router losses (means over MoE layers)
    are only computed when asked for.
    """
    tokens, segments = batch["tokens"], batch["segment_ids"]
    mutable = ["intermediates", "losses"] if with_router_losses else ["intermediates"]
    (hidden_btd, _), state = Llama4ForCausalLM(config).apply(
        {"params": params},
        tokens,
        batch["positions"],
        segments,
        mutable=mutable,
        method="forward",
        output="hidden",
    )
    targets_bt, weights_bt = next_token_targets(tokens, segments)
    with jax.named_scope("cross_entropy"):  # in sequence blocks: no [B, T, V] fp32 logits
        head_dv = lm_head_weights(config, params)
        ce_sum = cross_entropy_sum(hidden_btd, head_dv, targets_bt, weights_bt)
    loads = _collect(state.get("intermediates", {}), "tokens_per_expert")
    load_le = (
        jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in loads])
        if loads
        else jnp.zeros((0, config.num_local_experts), jnp.int32)
    )
    router = {}
    if with_router_losses:
        for name in ("router_z_loss", "load_balance_loss"):
            values = _collect(state.get("losses", {}), name)
            router[name] = jnp.mean(jnp.concatenate([v.reshape(-1) for v in values]))
    return ce_sum, jnp.sum(weights_bt), router, load_le


def pretrain_objective(config: Llama4Config, tc: TrainConfig) -> Objective:
    """Next-token cross-entropy over packed rows (+ optional router losses)."""
    opt = tc.optimizer
    router_losses = opt.router_z_loss > 0 or opt.load_balance_loss > 0

    def loss(params, frozen, mb, total):
        del frozen
        ce_sum, _, router, load = loss_terms(config, params, mb, router_losses)
        value = ce_sum / total
        metrics = {"loss": value, "router_load": load}
        if router_losses:
            router = {k: v / tc.grad_accum for k, v in router.items()}
            value += opt.router_z_loss * router["router_z_loss"]
            value += opt.load_balance_loss * router["load_balance_loss"]
            metrics.update(router)
        return value, metrics

    def denominator(batch):
        _, weights = next_token_targets(batch["tokens"], batch["segment_ids"])
        return jnp.maximum(jnp.sum(weights), 1.0)

    return Objective(loss, denominator)


def pretrain_task(config: Llama4Config, tc: TrainConfig) -> Task:
    """Every parameter, trained on packed text (the loop's batches)."""
    model = Llama4ForCausalLM(config)

    def init_params(rng):
        return nn.unbox(model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"])

    rows = ((tc.batch_size, tc.seq_len), jnp.int32)
    return Task(
        "pretrain",
        pretrain_objective(config, tc),
        {"tokens": rows, "segment_ids": rows, "positions": rows},
        init_params,
        param_logical_axes(config),
    )


def _microbatches(batch: Batch, n: int) -> Batch:
    """[B, T] -> [n, B/n, T], micro-batch i = rows i, n+i, 2n+i, ... so every device keeps
    contributing rows to every micro-batch."""
    return {k: v.reshape(v.shape[0] // n, n, *v.shape[1:]).swapaxes(0, 1) for k, v in batch.items()}


def make_train_step(
    config: Llama4Config,
    tc: TrainConfig,
    tx: optax.GradientTransformation,
    objective: Objective | None = None,
):
    """(state, batch, frozen) -> (new state, metrics); batch rows are the global batch."""
    objective = objective or pretrain_objective(config, tc)
    schedule = lr_schedule(tc)

    def micro_grads(params, frozen, mb, denominator):
        (_, metrics), grads = jax.value_and_grad(objective.loss, has_aux=True)(
            params, frozen, mb, denominator
        )
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        return grads, metrics

    def train_step(
        state: TrainState, batch: Batch, frozen: Any = None
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        frozen = {} if frozen is None else frozen
        denominator = objective.denominator(batch)
        if tc.grad_accum == 1:
            grads, metrics = micro_grads(state.params, frozen, batch, denominator)
        else:

            def body(carry, mb):
                out = micro_grads(state.params, frozen, mb, denominator)
                return jax.tree.map(jnp.add, carry, out), None

            zeros = jax.eval_shape(
                micro_grads, state.params, frozen,
                jax.tree.map(lambda x: x[0], _microbatches(batch, 1)), denominator,
            )  # fmt: skip
            init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
            (grads, metrics), _ = jax.lax.scan(body, init, _microbatches(batch, tc.grad_accum))
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            **metrics,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "target_tokens": denominator,
        }
        metrics.setdefault("router_load", jnp.zeros((0, config.num_local_experts), jnp.int32))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


# ---- the trainer -----------------------------------------------------------------------------


def _check_divisible(config: Llama4Config, tc: TrainConfig, mesh: Mesh) -> None:
    """Batch rows and sequence must split evenly over the mesh axes that shard them."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    if (tc.batch_size // tc.grad_accum) % shards:
        raise ConfigError(
            f"batch size {tc.batch_size} / {tc.grad_accum} micro-batches must be divisible by "
            f"data x fsdp x expert = {shards} (mesh {dict(mesh.shape)})"
        )
    if tc.seq_len % mesh.shape["sequence"]:
        raise ConfigError(
            f"seq_len {tc.seq_len} is not divisible by sequence={mesh.shape['sequence']}"
        )


class Trainer:
    """Mesh, shardings, jitted init and train step for one (model, training) config and task
    (default: pretraining)."""

    def __init__(
        self,
        config: Llama4Config,
        tc: TrainConfig,
        mesh: Mesh | None = None,
        task: Task | Callable[[Mesh], Task] | None = None,
    ):
        """`task`: a Task, or a function of the mesh that builds one (frozen arrays are placed
        on the mesh)."""
        self.config, self.tc = config, tc
        self.mesh = mesh if mesh is not None else make_mesh(tc.mesh)
        _check_divisible(config, tc, self.mesh)
        if task is None:
            task = pretrain_task(config, tc)
        elif not isinstance(task, Task):
            task = task(self.mesh)
        self.task = task
        self.tx = make_optimizer(tc)
        self.model = Llama4ForCausalLM(config)
        self.param_shardings = param_shardings(task.param_axes, self.mesh, tc.strategy)
        abstract_params = jax.eval_shape(task.init_params, jax.random.key(0))
        self.state_shardings = TrainState(
            step=replicated(self.mesh),
            params=self.param_shardings,
            opt_state=optimizer_shardings(
                self.tx, abstract_params, self.param_shardings, self.mesh
            ),
        )
        self.batch_sharding = batch_sharding(self.mesh, tc.strategy)
        self.frozen_shardings = jax.tree.map(lambda x: x.sharding, task.frozen)
        self._init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        self._step = jax.jit(
            make_train_step(config, tc, self.tx, task.objective),
            in_shardings=(self.state_shardings, self.batch_sharding, self.frozen_shardings),
            out_shardings=(self.state_shardings, replicated(self.mesh)),
            donate_argnums=0,
        )

    def _init_state(self, rng: jax.Array) -> TrainState:
        params = self.task.init_params(rng)
        return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params))

    def init(self, seed: int) -> TrainState:
        """A fresh state, created directly sharded (never whole on one device); the task's
        `initial_params` (--init-from) when it has them."""
        if self.task.initial_params is not None:
            return self.state_from_params(self.task.initial_params)
        with mesh_context(self.mesh, self.tc.strategy):
            return self._init(jax.random.key(seed))

    def state_from_params(self, params: Any) -> TrainState:
        """A fresh optimizer state around existing params (placed onto the mesh)."""
        params = jax.device_put(params, self.param_shardings)
        init = jax.jit(
            lambda p: TrainState(jnp.zeros((), jnp.int32), p, self.tx.init(p)),
            out_shardings=self.state_shardings,
        )
        with mesh_context(self.mesh, self.tc.strategy):
            return init(params)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with the target shardings (for restoring checkpoints)."""
        shapes = jax.eval_shape(self._init_state, jax.random.key(0))
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            shapes,
            self.state_shardings,
        )

    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        with mesh_context(self.mesh, self.tc.strategy):
            return self._step(state, batch, self.task.frozen)

    def compile(self, state: TrainState) -> float:
        """Compile the train step ahead of time; returns seconds."""
        start = time.perf_counter()
        batch = {
            name: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
            for name, (shape, dtype) in self.task.batch_spec.items()
        }
        with mesh_context(self.mesh, self.tc.strategy):
            self._step = self._step.lower(state, batch, self.task.frozen).compile()
        return time.perf_counter() - start
