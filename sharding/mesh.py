"""Device meshes from a short spec: `"data=2,fsdp=2,expert=2"`.

Axes, outermost first: `data` (pure data parallel; across slices on multi-slice pods), `fsdp`
(data parallel with parameters and optimizer state sharded), `expert` (experts sharded; tokens
also split over it outside the MoE), `sequence` (activations split along the sequence) and
`tensor` (heads and hidden dims split; innermost, on the fastest interconnect). Every mesh has
all five axes; unnamed ones have size 1, so one set of logical rules serves every strategy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from l4jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")


def parse_mesh_spec(spec: str | dict[str, int] | None, num_devices: int) -> dict[str, int]:
    """Axis sizes for every mesh axis. One size may be -1 (takes the remaining devices);
    an empty spec puts every device on `fsdp`."""
    if isinstance(spec, dict):
        sizes = dict(spec)
    else:
        sizes = {}
        for part in filter(None, (spec or "").replace(" ", "").split(",")):
            name, _, value = part.partition("=")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ConfigError(f"mesh spec {spec!r}: {part!r} is not AXIS=SIZE") from None
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"mesh spec {spec!r}: unknown axis {unknown[0]!r}; axes are {MESH_AXES}")
    if not sizes:
        sizes = {"fsdp": -1}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise ConfigError(f"mesh spec {spec!r}: sizes must be positive (at most one -1)")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(f"mesh spec {spec!r}: {fixed} does not divide {num_devices} devices")
        sizes[free[0]] = num_devices // fixed
    full = {name: sizes.get(name, 1) for name in MESH_AXES}
    if math.prod(full.values()) != num_devices:
        raise ConfigError(
            f"mesh spec {spec!r}: axis sizes multiply to {math.prod(full.values())}, "
            f"but there are {num_devices} devices"
        )
    return full


def make_mesh(
    spec: str | dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh over `devices` (default: all), topology-aware on TPU, multi-slice aware.

    On multi-slice TPU jobs the `data` axis spans slices (DCN) and the other axes stay
    inside a slice (ICI).
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices > 1:
        if sizes["data"] % num_slices:
            raise ConfigError(
                f"mesh: data={sizes['data']} must be a multiple of {num_slices} slices"
            )
        ici = (sizes["data"] // num_slices, *shape[1:])
        dcn = (num_slices,) + (1,) * (len(shape) - 1)
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)
