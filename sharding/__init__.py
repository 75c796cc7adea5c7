"""Meshes and logical-axis rules for l4jax (expert parallelism: `l4jax.expert_parallel`)."""

from sharding.mesh import MESH_AXES, make_mesh, parse_mesh_spec
from sharding.rules import (
    STRATEGIES,
    batch_sharding,
    logical_rules,
    mesh_context,
    param_shardings,
)

__all__ = [
    "MESH_AXES",
    "STRATEGIES",
    "batch_sharding",
    "logical_rules",
    "make_mesh",
    "mesh_context",
    "param_shardings",
    "parse_mesh_spec",
]
