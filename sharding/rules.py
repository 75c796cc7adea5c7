"""Logical-axis rules: how l4jax's named parameter and activation axes map onto mesh axes.

Rules claim mesh axes in list order per array; a mesh axis already claimed for the same array
is skipped, so later rules act as fallbacks (e.g. expert weights put `expert` on the
`expert` axis and their `embed` on `fsdp` alone). Axes of size 1 shard nothing, so one rule set
covers pure FSDP, FSDP+TP and FSDP+EP meshes; `STRATEGIES` names the variants that differ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, Any], ...]

_BATCH = ("data", "fsdp", "expert")

FSDP: Rules = (
    # activations
    ("activation_batch", _BATCH),
    ("activation_length", "sequence"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_vision_tiles", _BATCH),  # image tiles are split like token rows
    ("activation_vision_length", None),  # 577 positions (576 patches + CLS): a prime
    ("activation_vision_embed", None),
    # parameters
    ("layers", None),
    ("expert", "expert"),  # before `embed`: rules claim mesh axes in list order
    ("vocab", "tensor"),
    ("embed", ("fsdp", "expert")),  # non-expert weights: sharded over fsdp x expert
    ("embed", "fsdp"),  # expert weights (expert axis already taken by their `expert` dim)
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("router_experts", None),
    ("norm", None),
    ("lora_rank", None),  # LoRA adapters: every other axis as the weight they adapt
    # vision tower (l4jax.vision), Megatron-style like the text layers: attention heads and MLP
    # hidden on `tensor`, the hidden size on fsdp x expert. The adapter's fc1 takes `tensor` on
    # its output (`vision_adapter`), so its input (`vision_mlp`) falls back to fsdp x expert;
    # the projector's input (`vision_adapter_out`) falls back to `tensor` (`embed` took fsdp).
    ("vision_embed", ("fsdp", "expert")),
    ("vision_heads", "tensor"),
    ("vision_adapter", "tensor"),
    ("vision_mlp", "tensor"),
    ("vision_mlp", ("fsdp", "expert")),
    ("vision_adapter_out", ("fsdp", "expert")),
    ("vision_adapter_out", "tensor"),
    ("vision_patch", None),
    ("vision_positions", None),
    # KV cache
    ("cache_batch", _BATCH),
    ("cache_length", None),  # chunked layers' rings: one chunk, kept whole
    ("cache_global_length", "sequence"),  # global layers: flash-decoding over the shards
    ("cache_kv_heads", "tensor"),
    ("cache_head_dim", None),
)

STRATEGIES: dict[str, Rules] = {
    "fsdp": FSDP,  # FSDP, FSDP+TP and FSDP+EP, by the mesh's axis sizes
    # sequence parallel for long contexts: activations split along length over `sequence`
    # (already in FSDP); replicated keeps every parameter whole (small models, debugging)
    "replicated": tuple((name, None) for name, _ in FSDP if not name.startswith("activation")),
}


def logical_rules(strategy: str = "fsdp") -> Rules:
    if strategy not in STRATEGIES:
        raise ValueError(
            f"unknown sharding strategy {strategy!r}; choose from {sorted(STRATEGIES)}"
        )
    return STRATEGIES[strategy]


def param_shardings(logical_specs: Any, mesh: Mesh, strategy: str = "fsdp") -> Any:
    """NamedShardings for a pytree of logical PartitionSpecs (e.g. `param_logical_axes`)."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, logical_rules(strategy))


def spec_for(logical_axes: tuple[str | None, ...], strategy: str = "fsdp") -> PartitionSpec:
    return nn.logical_to_mesh_axes(logical_axes, logical_rules(strategy))


def named(
    mesh: Mesh, logical_axes: tuple[str | None, ...], strategy: str = "fsdp"
) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical_axes, strategy))


def shard_params(params: Any, logical_specs: Any, mesh: Mesh, strategy: str = "fsdp") -> Any:
    """Place an existing param tree onto `mesh` by its logical axes."""
    return jax.device_put(params, param_shardings(logical_specs, mesh, strategy))


# logical axes of a batch of token rows [B, T] (tokens, segment_ids, positions)
BATCH_AXES = ("activation_batch", "activation_length")


def batch_sharding(mesh: Mesh, strategy: str = "fsdp") -> NamedSharding:
    """Rows over the data-parallel axes (data, fsdp, expert), length over `sequence`."""
    return named(mesh, BATCH_AXES, strategy)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def optimizer_shardings(
    tx: optax.GradientTransformation, abstract_params: Any, param_sharding: Any, mesh: Mesh
) -> Any:
    """Shardings of `tx.init(params)`: every per-parameter buffer (Adam's mu and nu, ...)
    sharded like its parameter, everything else (step counts) replicated."""
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_state,
        param_sharding,
        transform_non_params=lambda _: replicated(mesh),
    )


@contextlib.contextmanager
def mesh_context(mesh: Mesh, strategy: str = "fsdp") -> Iterator[None]:
    """The mesh and the logical-axis rules that model code (`nn.with_logical_constraint`) and
    `jax.jit` tracing need, together."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules(strategy)):
        yield
