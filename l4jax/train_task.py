"""What a training run trains: `Task` (objective, batches, trainable params) and `Objective`.

Below both the training loop (`l4jax.train`, `l4jax.train_step`) and `l4jax.post`: pretraining
builds its Task in `l4jax.train_step`, sft/dpo/grpo in `l4jax.post.tasks`, and `l4jax train`
picks one by `--task`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

Batch = dict[str, jax.Array]  # tokens, segment_ids, positions: [B, T] int32


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


@dataclasses.dataclass
class Task:
    """What `train` trains: an objective, its batches, and which parameters it trains.

    `l4jax.train_step.pretrain_task` trains every parameter on packed text;
    `l4jax.post.make_task` builds sft, dpo and grpo (with LoRA the trained params are the
    adapters and the base is `frozen`).
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
