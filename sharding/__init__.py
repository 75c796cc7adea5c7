"""Meshes, logical-axis rules and expert parallelism for l4jax."""

from sharding.expert import ExpertParallel  # importing it installs the MoE mesh dispatch
from sharding.mesh import MESH_AXES, make_mesh, parse_mesh_spec
from sharding.rules import (
    STRATEGIES,
    batch_sharding,
    logical_rules,
    mesh_context,
    param_shardings,
)

__all__ = [
    "ExpertParallel",
    "MESH_AXES",
    "STRATEGIES",
    "batch_sharding",
    "logical_rules",
    "make_mesh",
    "mesh_context",
    "param_shardings",
    "parse_mesh_spec",
]
