"""Expert parallelism: the MoE router and routed experts under `shard_map`, dropless.

Outside the MoE, tokens are split over the token axes (`activation_batch` x `activation_length`:
data, fsdp, expert, sequence); expert weights `[E, D, F]` are split over the expert axes
(`expert`) on E and the hidden axes (`mlp` -> tensor) on F. Inside `shard_map`, per device:

    ids, scores     = route(local tokens)                                # router replicated
    x, ids, scores  = all_gather(local tokens, over the expert axes)     # [S*T_l, D], S shards
    y               = routed_experts(x, ids, scores, local experts [E/S, D, F/TP],
                                     expert_offset = expert index * E/S)  # other experts add 0
    y               = psum_scatter(y, over the expert axes)               # back to [T_l, D]
    y               = psum(y, over the hidden axes)                       # down_proj partial sums

Every (token, expert) pair is computed exactly once, on the device that holds the expert, with
the local backend (`ragged_dot` or `pallas`): no capacity, nothing dropped. The all-gather +
reduce-scatter formulation moves S*T_l*D values each way per device where a ragged all-to-all
would move about T_l*k*D; it is used because `jax.lax.ragged_all_to_all` does not run on
XLA:CPU in jax 0.10.2 ("HLO opcode ragged-all-to-all is not supported by XLA:CPU"). The local
grouped matmuls only do the rows routed here: rows for other shards' experts sort past
`sum(group_sizes)`, which `chunked_gmm` skips and the Pallas kernel does not multiply.

The MoE layer (`l4jax.model.MoE`) asks `current_dispatch()` for its dispatch: under an
ambient mesh (`jax.set_mesh(mesh)`) of more than one device it is `ExpertParallel`, else
`moe.local_dispatch`; nothing is installed by an import. The mesh's axis roles come from the
active `flax.linen.logical_axis_rules`, else from `DEFAULT_RULES` (the roles
`sharding.rules.logical_rules()` gives these axes; tests/test_expert_parallel.py checks that
they agree). This module sits beside the model, below `sharding`: the core never imports it.
Everything here is differentiable: `shard_map` transposes all_gather into psum_scatter.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec

from l4jax import moe
from l4jax.errors import ConfigError
from l4jax.quantization import spec_like

Array = jax.Array
AxisNames = tuple[str, ...]
Rules = tuple[tuple[str, object], ...]  # flax logical-axis rules: (logical name, mesh axes)

TOKEN_LOGICAL_AXES = ("activation_batch", "activation_length")
# the roles of the mesh axes when no logical-axis rules are active: tokens over the data-parallel
# axes and `sequence`, experts over `expert`, the expert hidden dim over `tensor`
DEFAULT_RULES: Rules = (
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", "sequence"),
    ("expert", "expert"),
    ("mlp", "tensor"),
)


def _mesh_axes(logical: Sequence[str], rules: Rules, mesh: AbstractMesh) -> AxisNames:
    """The mesh axes (of size > 1, in order) that `logical` axes map to under `rules`."""
    spec = nn.logical_to_mesh_axes(tuple(logical), rules)
    names: list[str] = []
    for entry in spec:
        for name in (entry,) if isinstance(entry, str) else (entry or ()):
            if mesh.shape.get(name, 1) > 1 and name not in names:
                names.append(name)
    return tuple(names)


def _spec(*dims: AxisNames) -> PartitionSpec:
    return PartitionSpec(*(d if d else None for d in dims))


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """A `moe.Dispatch` that runs the routed experts under `shard_map` on `mesh`.

    `token_axes`: mesh axes the tokens are split over (outermost first); `expert_axes`: over
    which the expert dim of the weights is split; `hidden_axes`: over which their F dim is.
    """

    mesh: AbstractMesh
    token_axes: AxisNames
    expert_axes: AxisNames
    hidden_axes: AxisNames

    @classmethod
    def from_rules(cls, mesh: AbstractMesh, rules: Rules | None = None) -> ExpertParallel:
        rules = rules or DEFAULT_RULES
        dispatch = cls(
            mesh,
            token_axes=_mesh_axes(TOKEN_LOGICAL_AXES, rules, mesh),
            expert_axes=_mesh_axes(("expert",), rules, mesh),
            hidden_axes=_mesh_axes(("mlp",), rules, mesh),
        )
        clash = set(dispatch.hidden_axes) & set(dispatch.token_axes + dispatch.expert_axes)
        if clash:
            raise ConfigError(
                f"expert parallelism: mesh axes {sorted(clash)} split both the expert hidden "
                "dim (`mlp`) and the tokens or experts; give them separate axes in the rules"
            )
        return dispatch

    def _size(self, axes: AxisNames) -> int:
        return math.prod(self.mesh.shape[a] for a in axes)

    @property
    def gather_axes(self) -> AxisNames:
        """Expert axes the tokens are also split over: gathered in, reduce-scattered out."""
        return tuple(a for a in self.expert_axes if a in self.token_axes)

    @property
    def reduce_axes(self) -> AxisNames:
        """Axes whose devices hold partial sums of the same tokens' output: psum."""
        return tuple(a for a in self.expert_axes if a not in self.token_axes) + self.hidden_axes

    def __call__(
        self, impl: str, x_td: Array, router_de: Array, top_k: int, w: moe.ExpertWeights
    ) -> tuple[Array, moe.Routing]:
        num_experts, num_shards = w.gate_edf.shape[0], self._size(self.expert_axes)
        if num_experts % num_shards:
            raise ConfigError(
                f"expert parallelism: {num_experts} experts do not split over "
                f"{num_shards} devices of mesh axes {self.expert_axes}"
            )
        t = x_td.shape[0]
        pad = -t % self._size(self.token_axes)  # e.g. one decode token on many devices
        x_td = jnp.pad(x_td, ((0, pad), (0, 0)))  # padded tokens: not counted, cut off below
        valid_t = jnp.arange(t + pad) < t
        tok, ex, hid = self.token_axes, self.expert_axes, self.hidden_axes
        w_specs = moe.ExpertWeights(_spec(ex, (), hid), _spec(ex, (), hid), _spec(ex, hid, ()))
        w_specs = moe.ExpertWeights(*map(spec_like, w, w_specs))  # quantized: values + scales
        tok2 = _spec(tok, ())
        run = jax.shard_map(
            functools.partial(self._local, impl, top_k, num_experts // num_shards),
            mesh=self.mesh,
            in_specs=(tok2, _spec(tok), PartitionSpec(), w_specs),
            out_specs=(tok2, moe.Routing(tok2, tok2, PartitionSpec(), tok2)),
            check_vma=False,  # the custom_vjp grouped matmuls carry no varying-axis types
        )
        y_td, routing = run(x_td, valid_t, router_de, w)
        ids, scores, counts, logits = routing
        return y_td[:t], moe.Routing(ids[:t], scores[:t], counts, logits[:t])

    def _local(
        self,
        impl: str,
        top_k: int,
        num_local: int,
        x_td: Array,
        valid_t: Array,
        router_de: Array,
        w: moe.ExpertWeights,
    ) -> tuple[Array, moe.Routing]:
        """Per device: route this token shard, then its [T_l, D] routed term."""
        routing = moe.route(x_td, router_de, top_k)
        counts = moe.expert_counts(routing.expert_ids_tk, router_de.shape[1], valid_t)
        if self.token_axes:
            counts = jax.lax.psum(counts, self.token_axes)
        gather = self.gather_axes
        x_all, ids_all, scores_all = x_td, routing.expert_ids_tk, routing.scores_tk
        if gather:
            x_all, ids_all, scores_all = (
                jax.lax.all_gather(a, gather, axis=0, tiled=True)
                for a in (x_all, ids_all, scores_all)
            )
        offset = jax.lax.axis_index(self.expert_axes) * num_local if self.expert_axes else 0
        with jax.named_scope("local_experts"):
            y_td = moe.routed_experts(impl, x_all, ids_all, scores_all, w, offset)
        if gather:
            y_td = jax.lax.psum_scatter(y_td, gather, scatter_dimension=0, tiled=True)
        if self.reduce_axes:
            y_td = jax.lax.psum(y_td, self.reduce_axes)
        return y_td, routing._replace(tokens_per_expert=counts)


def dispatch_for_mesh(mesh: AbstractMesh) -> ExpertParallel | None:
    """The expert-parallel dispatch for an ambient mesh of more than one device whose axes are
    not already manual (inside another shard_map), else None (single-device dispatch)."""
    if mesh.empty or math.prod(mesh.shape.values()) <= 1 or mesh.manual_axes:
        return None
    return ExpertParallel.from_rules(mesh, nn.get_logical_axis_rules() or None)


def current_dispatch() -> moe.Dispatch:
    """The dispatch for the ambient mesh (`jax.sharding.get_abstract_mesh()`): expert-parallel
    on a mesh of several devices, else `moe.local_dispatch` (which XLA partitions as it can).
    Read when tracing; the mesh is part of jit's cache key."""
    return dispatch_for_mesh(jax.sharding.get_abstract_mesh()) or moe.local_dispatch
