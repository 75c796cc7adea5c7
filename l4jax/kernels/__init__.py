"""Pallas TPU kernels for l4jax."""

from l4jax.kernels.gmm import (
    DEFAULT_TILING,
    GroupSchedule,
    gmm,
    gmm_swiglu,
    make_group_schedule,
    tgmm,
)
from l4jax.kernels.quantized import qgmm, qgmm_swiglu

__all__ = [
    "DEFAULT_TILING",
    "GroupSchedule",
    "gmm",
    "gmm_swiglu",
    "make_group_schedule",
    "qgmm",
    "qgmm_swiglu",
    "tgmm",
]
