"""Pallas TPU kernels for l4jax."""

from l4jax.kernels.gmm import (
    DEFAULT_TILING,
    GroupSchedule,
    gmm,
    gmm_swiglu,
    make_group_schedule,
    tgmm,
)

__all__ = ["DEFAULT_TILING", "GroupSchedule", "gmm", "gmm_swiglu", "make_group_schedule", "tgmm"]
