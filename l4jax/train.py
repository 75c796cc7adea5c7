"""Sharded training: train state, optimizer, train step, metrics and the training loop.

The same code runs on one CPU, on simulated devices, on several processes and on a TPU pod:

- the mesh comes from a short spec (`sharding.make_mesh("data=2,fsdp=2,expert=2")`), logical
  axis rules (`sharding.rules`) decide how every parameter, optimizer buffer and batch is
  sharded, and the state is created directly sharded (`jax.jit(init, out_shardings=...)`);
- the train step is one `jax.jit` with explicit in/out shardings and the state donated:
  cross-entropy over packed rows (no prediction across segment boundaries, padding masked),
  optional router z-loss / load-balance loss (off by default, as in the references), gradient
  accumulation over micro-batches, global-norm clipping and AdamW with a warmup-cosine schedule;
  compute runs in `config.dtype` over `config.param_dtype` master weights, rematerialised by
  `config.remat_policy`;
- the loop reads Grain batches, saves Orbax checkpoints (params, optimizer, step, iterator)
  every `save_every` steps, resumes from the latest one, and reports loss, grad norm, tokens/s,
  MFU and router load to stdout, a progress bar, TensorBoard and a JSONL file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from l4jax.config import Llama4Config
from l4jax.errors import ConfigError
from l4jax.losses import cross_entropy_sum
from l4jax.model import Llama4ForCausalLM, lm_head_weights, param_logical_axes
from pipelines.packing import next_token_targets
from sharding.mesh import make_mesh
from sharding.rules import (
    batch_sharding,
    mesh_context,
    optimizer_shardings,
    param_shardings,
    replicated,
)

log = logging.getLogger(__name__)

Batch = dict[str, jax.Array]  # tokens, segment_ids, positions: [B, T] int32
TASKS = ("pretrain", "sft", "dpo", "grpo")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run except the model (`Llama4Config`)."""

    steps: int = 150
    batch_size: int = 8  # global rows per step (all hosts, all micro-batches)
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per step
    learning_rate: float = 3e-3
    warmup_steps: int = 15
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    router_z_loss: float = 0.0  # coefficient; 0 = off (the references use none)
    load_balance_loss: float = 0.0
    seed: int = 0
    mesh: str = ""  # e.g. "data=2,fsdp=2,expert=2"; empty = every device on fsdp
    strategy: str = "fsdp"
    data: str | None = None  # None = the built-in corpus
    data_field: str = "text"
    data_workers: int = 0
    tokenizer: str | None = None
    checkpoint_dir: str | None = None
    save_every: int = 50
    keep: int = 3
    async_checkpoint: bool = True
    log_every: int = 10
    metrics_jsonl: str | None = None
    tensorboard_dir: str | None = None  # default: <checkpoint_dir>/tensorboard
    progress: bool = True
    sample_tokens: int = 200
    sample_prompt: str = "def "
    sample_temperature: float = 0.7  # also the GRPO rollout temperature
    task: str = "pretrain"  # pretrain | sft | dpo | grpo (l4jax.post)
    post: Any = None  # l4jax.post.PostConfig of the sft/dpo/grpo/LoRA settings

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "save_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"TrainConfig.{name}: must be a positive int, got {value!r}")
        if self.task not in TASKS:
            raise ConfigError(f"TrainConfig.task: {self.task!r} is not one of {TASKS}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"TrainConfig.batch_size: {self.batch_size} is not divisible by "
                f"grad_accum={self.grad_accum}"
            )


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # [] int32, optimizer steps taken
    params: Any
    opt_state: Any


# ---- optimizer ---------------------------------------------------------------------------------


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then cosine decay to `learning_rate * min_lr_ratio`."""
    warmup = min(tc.warmup_steps, max(tc.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(tc.steps, warmup + 1),
        end_value=tc.learning_rate * tc.min_lr_ratio,
    )


def _decay_mask(params: Any) -> Any:
    """Weight decay on weight matrices, not on norm scales."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) != "scale", params
    )


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay) on the warmup-cosine schedule."""
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(
            lr_schedule(tc),
            b1=tc.b1,
            b2=tc.b2,
            eps=tc.eps,
            weight_decay=tc.weight_decay,
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


class Objective(NamedTuple):
    """What a train step minimises.

    `loss(params, frozen, micro_batch, denominator) -> (value, metrics)`: `value` is
    differentiated w.r.t. `params` and `metrics` (arrays) are summed over micro-batches;
    `denominator(batch)` is computed once on the whole batch (e.g. its target tokens), so
    micro-batches add up to the full batch's mean. `frozen` holds arrays that are read but not
    trained (a LoRA base, a DPO/GRPO reference); pretraining has none.
    """

    loss: Callable[[Any, Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
    denominator: Callable[[Batch], jax.Array]


def pretrain_objective(config: Llama4Config, tc: TrainConfig) -> Objective:
    """Next-token cross-entropy over packed rows (+ optional router losses)."""
    router_losses = tc.router_z_loss > 0 or tc.load_balance_loss > 0

    def loss(params, frozen, mb, total):
        del frozen
        ce_sum, _, router, load = loss_terms(config, params, mb, router_losses)
        value = ce_sum / total
        metrics = {"loss": value, "router_load": load}
        if router_losses:
            router = {k: v / tc.grad_accum for k, v in router.items()}
            value += tc.router_z_loss * router["router_z_loss"]
            value += tc.load_balance_loss * router["load_balance_loss"]
            metrics.update(router)
        return value, metrics

    def denominator(batch):
        _, weights = next_token_targets(batch["tokens"], batch["segment_ids"])
        return jnp.maximum(jnp.sum(weights), 1.0)

    return Objective(loss, denominator)


@dataclasses.dataclass
class Task:
    """What `train` trains: an objective, its batches, and which parameters it trains.

    `pretrain_task` trains every parameter on packed text; `l4jax.post.make_task` builds sft,
    dpo and grpo (with LoRA the trained params are the adapters and the base is `frozen`).
    """

    name: str
    objective: Objective
    batch_spec: dict[str, tuple[tuple[int, ...], Any]]  # name -> (global shape, dtype)
    init_params: Callable[[jax.Array], Any]  # rng -> fresh trainable params
    param_axes: Any  # logical PartitionSpecs of the trainable params
    frozen: Any = dataclasses.field(default_factory=dict)  # placed on the mesh by the task
    initial_params: Any = None  # trainable params to start from (--init-from), else init
    # -> (iterator of host batches with get_state/set_state, description)
    data: Callable[[], tuple[Any, str]] | None = None
    # (state, host batch) -> (global device batch, host metrics); None: to_global_array
    prepare: Callable[[Any, Any], tuple[Batch, dict[str, float]]] | None = None
    # trainable params -> the model's full param tree (LoRA: base + adapters, merged)
    model_params: Callable[[Any], Any] | None = None


def pretrain_task(config: Llama4Config, tc: TrainConfig) -> Task:
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


# ---- FLOPs and MFU -------------------------------------------------------------------------

# dense bf16 peak FLOP/s per device, by `device_kind` prefix (vendor data sheets)
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}
# CPU: a nominal 32 fp32 FLOP/cycle/core (two AVX2 FMA units) at 3 GHz, shared by the host's
# CPU devices; not a measured peak, so CPU MFU is only a relative number
CPU_NOMINAL_FLOPS_PER_CORE = 32 * 3e9


def device_peak_flops(device: jax.Device | None = None) -> tuple[float, bool]:
    """(peak FLOP/s of one device, whether it is only nominal)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for prefix, flops in PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return flops, False
    cores = os.cpu_count() or 1
    return CPU_NOMINAL_FLOPS_PER_CORE * cores / max(len(jax.local_devices()), 1), True


def flops_per_token(config: Llama4Config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6 x the active matmul
    parameters (top-k routed experts + shared expert + router + attention projections +
    dense layers + lm_head; not the embedding gather) plus attention scores and values over
    the keys each query sees (causal, and chunked on chunked layers)."""
    d, v = config.hidden_size, config.vocab_size
    active = config.num_params(active=True) - v * d * (0 if config.tie_word_embeddings else 1)
    active -= d * (2 * config.num_hidden_layers + 1)  # norm scales
    flops = 6.0 * active
    n_h = config.num_attention_heads * config.head_dim
    for chunked in config.chunked_layers:
        span = min(seq_len, config.attention_chunk_size or seq_len) if chunked else seq_len
        mean_keys = (span + 1) / 2  # causal: query i sees i + 1 keys inside its span
        flops += 3 * 2 * 2 * n_h * mean_keys  # (q k^T, p v) x (fwd + 2 bwd)
    return flops


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


# ---- sampling ------------------------------------------------------------------------------


def sample_text(
    config: Llama4Config,
    params: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.7,
    seed: int = 0,
) -> str:
    """`prompt` and a sampled continuation (`l4jax.generate`, KV-cached decoding)."""
    from l4jax.decoding import generate

    prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
    stops = [i for i in getattr(tokenizer, "stop_tokens", []) if i < config.vocab_size]
    ids = generate(
        Llama4ForCausalLM(config), params, prompt_ids, max_new_tokens,
        temperature=temperature, seed=seed, stop_ids=stops,
        pad_id=getattr(tokenizer, "pad_id", None),
    )[0, len(prompt_ids) :]  # fmt: skip
    new = []
    for token in ids.tolist():
        if token in stops:
            break
        new.append(token)
    return prompt + tokenizer.decode(new)


# ---- metrics output --------------------------------------------------------------------------


class MetricsWriter:
    """One record per step to JSONL and TensorBoard (process 0 only), a line every
    `log_every` steps to the log/progress bar."""

    def __init__(self, tc: TrainConfig, resume_step: int):
        self.primary = jax.process_index() == 0
        self.jsonl = None
        self.tb = None
        if not self.primary:
            return
        if tc.metrics_jsonl:
            path = Path(tc.metrics_jsonl)
            path.parent.mkdir(parents=True, exist_ok=True)
            _truncate_jsonl(path, resume_step)
            self.jsonl = open(path, "a")
        tb_dir = tc.tensorboard_dir or (
            str(Path(tc.checkpoint_dir) / "tensorboard") if tc.checkpoint_dir else None
        )
        if tb_dir:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(tb_dir)

    def write(self, record: dict[str, Any], load_e: np.ndarray | None) -> None:
        if not self.primary:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tb:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, step)
            if load_e is not None and load_e.size:
                self.tb.add_histogram(
                    "router/expert_fraction", load_e, step, bins=min(64, load_e.size)
                )

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def _truncate_jsonl(path: Path, resume_step: int) -> None:
    """Drop records of steps after the checkpoint a run resumes from (they are redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= resume_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def step_record(
    step: int, metrics: dict[str, np.ndarray], seconds: float | None, tc: TrainConfig, fpt: float
) -> tuple[dict[str, Any], np.ndarray | None]:
    """The JSON record of one step, and the per-expert load fractions (mean over layers)."""
    record: dict[str, Any] = {
        "step": step,
        "loss": float(metrics["loss"]),
        "grad_norm": float(metrics["grad_norm"]),
        "lr": float(metrics["lr"]),
    }
    for name, value in metrics.items():  # the objective's own scalars (dpo, grpo, router)
        if name not in record and name != "target_tokens" and np.ndim(value) == 0:
            record[name] = float(value)
    if seconds is not None and seconds > 0:
        tokens_per_s = tc.batch_size * tc.seq_len / seconds
        peak, nominal = device_peak_flops()
        record["step_seconds"] = seconds
        record["tokens_per_s"] = tokens_per_s
        record["mfu"] = fpt * tokens_per_s / (peak * jax.device_count())
        record["mfu_peak_is_nominal"] = nominal
    load_le = np.asarray(metrics["router_load"], np.float64)
    frac_e = None
    if load_le.size:
        frac_le = load_le / np.maximum(load_le.sum(-1, keepdims=True), 1)
        frac_e = frac_le.mean(0)
        record["router_max_load"] = float((frac_le.max(-1) * load_le.shape[-1]).mean())
        record["router_load"] = [round(float(f), 5) for f in frac_e]
    return record, frac_e


def _log_line(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']:>6}", f"loss {record['loss']:.4f}"]
    parts.append(f"grad_norm {record['grad_norm']:.3f}")
    parts.append(f"lr {record['lr']:.2e}")
    if "tokens_per_s" in record:
        nominal = " (nominal CPU peak)" if record["mfu_peak_is_nominal"] else ""
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        parts.append(f"MFU {100 * record['mfu']:.2f}%{nominal}")
    for name in ("reward_accuracy", "reward_margin", "reward_mean", "kl"):  # dpo, grpo
        if name in record:
            parts.append(f"{name} {record[name]:.3f}")
    if "router_max_load" in record:
        parts.append(f"router max/mean load {record['router_max_load']:.2f}")
    return " | ".join(parts)


# ---- the training loop -------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    losses: dict[int, float]  # step -> loss of the steps this call ran
    start_step: int
    compile_seconds: float
    sample: str | None


def train(
    config: Llama4Config,
    tc: TrainConfig,
    *,
    source: Any = None,
    tokenizer: Any = None,
    mesh: Mesh | None = None,
    sample: bool = True,
    task: Task | Callable[[Mesh], Task] | None = None,
) -> TrainResult:
    """Train `config` as `tc` says; resumes from `tc.checkpoint_dir` when it holds a checkpoint.

    `task` (default: `tc.task`, pretraining or `l4jax.post.make_task`) gives the objective, the
    data and the trainable params."""
    from tqdm.auto import tqdm

    from l4jax.checkpoint import TrainCheckpointer, write_run_config
    from l4jax.inputs import check_positions, check_tokenizer
    from pipelines import DataConfig, make_dataset, to_global_array, tokenizer_for
    from pipelines.sources import default_corpus, open_source

    tokenizer = tokenizer or tokenizer_for(config, tc.tokenizer)
    check_tokenizer(tokenizer, config.vocab_size)
    check_positions(tc.seq_len, config.max_position_embeddings, "--seq-len")
    if task is None and tc.task != "pretrain":
        from l4jax.post import make_task  # sft, dpo, grpo, LoRA

        task = functools.partial(make_task, config, tc, tokenizer)
    trainer = Trainer(config, tc, mesh, task)
    log.info(
        "mesh %s, %s parameters (%s active per token)",
        dict(trainer.mesh.shape),
        f"{config.num_params():,}",
        f"{config.num_params(active=True):,}",
    )
    if trainer.task.data is not None:
        iterator, description = trainer.task.data()
        log.info("%s data: %s, tokenizer %r", tc.task, description, tokenizer)
    else:
        if source is None:
            source = open_source(tc.data, tc.data_field) if tc.data else default_corpus()
        log.info("data: %r, tokenizer %r", source, tokenizer)
        data_config = DataConfig(
            tc.seq_len, tc.batch_size, tc.seed, tc.data_workers, vocab_size=config.vocab_size
        )
        iterator = iter(make_dataset(source, tokenizer, data_config))
    checkpointer = None
    start = 0
    if tc.checkpoint_dir:
        # config.json makes each step an l4jax checkpoint: only when it holds the full model
        full = trainer.task.model_params is None
        checkpointer = TrainCheckpointer(  # (first: it locks the directory)
            tc.checkpoint_dir, tc.keep, tc.async_checkpoint, config=config if full else None
        )
        write_run_config(tc.checkpoint_dir, config, dataclasses.asdict(tc))
        latest = checkpointer.latest_step()
    else:
        latest = None
    if latest is not None:
        state = checkpointer.restore(latest, trainer.abstract_state(), iterator)
        start = latest
        log.warning("resumed from %s at step %d", tc.checkpoint_dir, latest)
    else:
        state = trainer.init(tc.seed)
    compile_seconds = 0.0
    if start < tc.steps:
        compile_seconds = trainer.compile(state)
        log.info("train step compiled in %.1f s", compile_seconds)
    fpt = flops_per_token(config, tc.seq_len)
    writer = MetricsWriter(tc, start)
    losses: dict[int, float] = {}
    bar = tqdm(
        total=tc.steps, initial=start, desc="train", unit="step",
        disable=not tc.progress or jax.process_index() != 0 or not sys.stderr.isatty(),
        dynamic_ncols=True,
    )  # fmt: skip
    pending = None  # (step, metrics on device): read one step late, so dispatch runs ahead

    def report(step, metrics, done_time):
        nonlocal last_time
        host = {**jax.device_get(metrics[0]), **metrics[1]}
        seconds, last_time = done_time - last_time, done_time
        record, frac = step_record(step, host, seconds, tc, fpt)
        losses[step] = record["loss"]
        writer.write(record, frac)
        postfix = {"loss": f"{record['loss']:.3f}"}
        if "tokens_per_s" in record:
            postfix["tok/s"] = f"{record['tokens_per_s']:,.0f}"
        bar.set_postfix(postfix)
        bar.update(1)
        if (step % tc.log_every == 0 or step == tc.steps) and jax.process_index() == 0:
            if tc.progress:
                bar.write(_log_line(record))
            else:
                log.info(_log_line(record))

    last_time = time.perf_counter()
    try:
        for step in range(start + 1, tc.steps + 1):
            if trainer.task.prepare is not None:  # e.g. GRPO rollouts from the current policy
                batch, host_metrics = trainer.task.prepare(state, next(iterator))
            else:
                batch = to_global_array(next(iterator), trainer.batch_sharding)
                host_metrics = {}
            state, metrics = trainer.step(state, batch)
            if pending is not None:
                jax.block_until_ready(pending[1][0]["loss"])
                report(pending[0], pending[1], time.perf_counter())
            pending = (step, (metrics, host_metrics))
            if checkpointer and (step % tc.save_every == 0 or step == tc.steps):
                checkpointer.save(step, state, iterator)
        if pending is not None:
            jax.block_until_ready(pending[1][0]["loss"])
            report(pending[0], pending[1], time.perf_counter())
    finally:
        bar.close()
        writer.close()
        if checkpointer:
            checkpointer.close()
        if hasattr(iterator, "close"):
            iterator.close()
    text = None
    if sample and tc.sample_tokens > 0 and jax.process_count() > 1:
        log.info("no sample at the end of a multi-process run (sample from the checkpoint)")
    elif sample and tc.sample_tokens > 0:
        params = state.params
        if trainer.task.model_params is not None:
            params = trainer.task.model_params(params)
        text = sample_text(
            config, params, tokenizer, tc.sample_prompt, tc.sample_tokens,
            tc.sample_temperature, tc.seed,
        )  # fmt: skip
    return TrainResult(state, losses, start, compile_seconds, text)


__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "Trainer",
    "device_peak_flops",
    "flops_per_token",
    "lr_schedule",
    "make_optimizer",
    "make_train_step",
    "sample_text",
    "train",
]


# ---- command line: `l4jax train` ---------------------------------------------------------------


def add_train_arguments(p: Any) -> None:
    """The `l4jax train` flags (an argparse parser)."""
    from l4jax.config import PRESETS, REMAT_POLICIES
    from sharding.rules import STRATEGIES

    d = TrainConfig()
    model = p.add_argument_group("model")
    model.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    model.add_argument("--config", help="a Hugging Face config.json (instead of --preset)")
    model.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype")
    model.add_argument("--param-dtype", choices=("float32", "bfloat16"), help="master weights")
    model.add_argument("--moe-impl", choices=("auto", "ragged_dot", "pallas", "megablox", "dense"))
    model.add_argument("--remat", choices=REMAT_POLICIES, help="rematerialisation policy")
    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        help="text file, directory, JSONL, Parquet or ArrayRecord (default: the built-in corpus, "
        "the Python standard library's source)",
    )
    data.add_argument("--data-field", default=d.data_field, help="JSONL/Parquet text field")
    data.add_argument("--tokenizer", help="tokenizer.model / tokenizer.json (default: by vocab)")
    data.add_argument("--data-workers", type=int, default=d.data_workers)
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=d.steps)
    opt.add_argument("--batch-size", type=int, default=d.batch_size, help="global rows per step")
    opt.add_argument("--seq-len", type=int, default=d.seq_len)
    opt.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches")
    opt.add_argument("--lr", type=float, default=d.learning_rate, help="peak learning rate")
    opt.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay)
    opt.add_argument("--clip-norm", type=float, default=d.clip_norm)
    opt.add_argument("--router-z-loss", type=float, default=0.0, help="coefficient (0: off)")
    opt.add_argument("--load-balance-loss", type=float, default=0.0, help="coefficient (0: off)")
    opt.add_argument("--seed", type=int, default=d.seed)
    par = p.add_argument_group("parallelism")
    par.add_argument("--mesh", default="", help="axis sizes, e.g. data=2,fsdp=2,expert=2")
    par.add_argument("--strategy", default=d.strategy, choices=sorted(STRATEGIES))
    par.add_argument("--coordinator", help="multi-process: coordinator host:port")
    par.add_argument("--num-processes", type=int, help="multi-process: number of processes")
    par.add_argument("--process-id", type=int, help="multi-process: this process's index")
    par.add_argument(
        "--distributed", action="store_true", help="jax.distributed.initialize() (TPU pods)"
    )
    out = p.add_argument_group("checkpoints and metrics")
    out.add_argument("--checkpoint-dir", help="default: runs/<preset>; resumes from it")
    out.add_argument("--no-checkpoint", action="store_true", help="train without checkpoints")
    out.add_argument("--save-every", type=int, default=d.save_every)
    out.add_argument("--keep", type=int, default=d.keep, help="checkpoints to keep")
    out.add_argument("--metrics-jsonl", help="default: <checkpoint-dir>/metrics.jsonl")
    out.add_argument("--tensorboard-dir", help="default: <checkpoint-dir>/tensorboard")
    out.add_argument("--log-every", type=int, default=d.log_every)
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--sample-tokens", type=int, default=d.sample_tokens, help="0: no sample")
    out.add_argument("--prompt", default=d.sample_prompt, help="prompt of the final sample")
    out.add_argument(
        "--temperature", type=float, default=d.sample_temperature,
        help="of the final sample, and of GRPO rollouts",
    )  # fmt: skip
    post = p.add_argument_group("post-training (docs/post_training.md)")
    post.add_argument("--task", default=d.task, choices=TASKS, help="the training objective")
    post.add_argument("--init-from", help="start from this checkpoint (HF, Meta, l4jax, a run)")
    post.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    post.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale alpha / rank")
    post.add_argument(
        "--lora-targets", default="attention",
        help="comma list: q_proj,k_proj,v_proj,o_proj,attention,shared_expert,experts,mlp",
    )  # fmt: skip
    post.add_argument("--beta", type=float, help="dpo: beta (0.1); grpo: KL weight (0.04)")
    post.add_argument("--label-smoothing", type=float, default=0.0, help="dpo: cDPO smoothing")
    post.add_argument("--reward", help="grpo: MODULE:FUNCTION, FILE.py:FUNCTION or a built-in")
    post.add_argument("--num-generations", type=int, default=8, help="grpo: per prompt")
    post.add_argument("--max-new-tokens", type=int, default=16, help="grpo: completion length")
    post.add_argument("--epsilon", type=float, default=0.2, help="grpo: ratio clip")
    post.add_argument("--grpo-iterations", type=int, default=1, help="grpo: steps per rollout")
    post.add_argument("--routing-replay", action="store_true", help="grpo: rollout's experts")
    post.add_argument(
        "--no-dynamic-filtering", action="store_true",
        help="grpo: keep groups whose rewards are all equal",
    )  # fmt: skip


def _initialize_distributed(args: Any) -> None:
    if args.coordinator or args.num_processes:
        # CPU devices of several processes talk through gloo (no effect on TPU/GPU)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    elif args.distributed:
        jax.distributed.initialize()


def model_config_from_args(args: Any) -> Llama4Config:
    from l4jax.config import preset

    runtime = {
        name: value
        for name, value in (
            ("dtype", args.dtype),
            ("param_dtype", args.param_dtype),
            ("moe_impl", args.moe_impl),
            ("remat_policy", args.remat),
        )
        if value is not None
    }
    if getattr(args, "init_from", None):  # the checkpoint's own model
        from l4jax.post.tasks import init_from_config

        return init_from_config(args.init_from, **runtime)
    if args.config:
        return Llama4Config.from_json_file(args.config, **runtime)
    return preset(args.preset, **runtime)


def train_config_from_args(args: Any) -> TrainConfig:
    checkpoint_dir = None
    if not args.no_checkpoint:
        name = Path(args.config).parent.name if args.config else args.preset
        checkpoint_dir = args.checkpoint_dir or str(Path("runs") / name)
    metrics = args.metrics_jsonl or (
        str(Path(checkpoint_dir) / "metrics.jsonl") if checkpoint_dir else None
    )
    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        grad_accum=args.grad_accum,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        clip_norm=args.clip_norm,
        router_z_loss=args.router_z_loss,
        load_balance_loss=args.load_balance_loss,
        seed=args.seed,
        mesh=args.mesh,
        strategy=args.strategy,
        data=args.data,
        data_field=args.data_field,
        data_workers=args.data_workers,
        tokenizer=args.tokenizer,
        checkpoint_dir=checkpoint_dir,
        save_every=args.save_every,
        keep=args.keep,
        log_every=args.log_every,
        metrics_jsonl=metrics,
        tensorboard_dir=args.tensorboard_dir,
        progress=not args.no_progress,
        sample_tokens=args.sample_tokens,
        sample_prompt=args.prompt,
        sample_temperature=args.temperature,
        task=args.task,
        post=post_config_from_args(args),
    )


def post_config_from_args(args: Any) -> Any:
    from l4jax.post.config import PostConfig

    return PostConfig(
        init_from=args.init_from,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        beta=args.beta,
        label_smoothing=args.label_smoothing,
        reward=args.reward,
        num_generations=args.num_generations,
        max_new_tokens=args.max_new_tokens,
        epsilon=args.epsilon,
        iterations=args.grpo_iterations,
        routing_replay=args.routing_replay,
        dynamic_filtering=not args.no_dynamic_filtering,
    )


def configure_train_logging() -> None:
    """INFO lines of l4jax, pipelines and sharding on stderr as `l4jax train: ...`. Idempotent:
    a second in-process call replaces its own handler instead of adding one (lines once)."""
    handler = logging.StreamHandler()
    handler.set_name("l4jax train")
    handler.setFormatter(logging.Formatter("l4jax train: %(message)s"))
    for name in ("l4jax", "pipelines", "sharding"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.get_name() == "l4jax train"]:
            logger.removeHandler(old)
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        logger.propagate = False


def run_cli(args: Any) -> int:
    """`l4jax train`: train, checkpoint, resume, report, and sample from the model."""
    _initialize_distributed(args)
    if not args.verbose:  # with -v the root logger already shows everything
        configure_train_logging()
    config = model_config_from_args(args)
    tc = train_config_from_args(args)
    primary = jax.process_index() == 0
    if primary:
        where = tc.checkpoint_dir or "no checkpoints"
        platform = jax.devices()[0].platform
        print(
            f"l4jax train: {args.config or 'preset ' + repr(args.preset)}, "
            f"{config.num_hidden_layers} layers, {config.num_local_experts} experts "
            f"(top-{config.num_experts_per_tok}, shared expert), {tc.steps} steps of "
            f"{tc.batch_size}x{tc.seq_len} tokens, {jax.device_count()} {platform} "
            f"device(s) in {jax.process_count()} process(es) -> {where}",
            flush=True,
        )
    start = time.perf_counter()
    result = train(config, tc)
    if primary:
        ran = sorted(result.losses)
        if ran:
            first, last = result.losses[ran[0]], result.losses[ran[-1]]
            print(
                f"l4jax train: steps {ran[0]}..{ran[-1]}: loss {first:.3f} -> {last:.3f} "
                f"in {time.perf_counter() - start:.0f} s (train step compile "
                f"{result.compile_seconds:.1f} s)"
            )
        else:
            print(f"l4jax train: already at step {result.start_step} of {tc.steps}")
        if result.sample is not None:
            print(f"l4jax train: sample (temperature {tc.sample_temperature}):\n{result.sample}")
    return 0
