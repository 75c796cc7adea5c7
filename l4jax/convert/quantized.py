"""Quantized l4jax checkpoints (`l4jax convert SRC DST --quantize int4|int8|fp8`).

A quantized weight (`l4jax.quantization.QArray`) is stored as Orbax stores that pytree node:
two arrays, `<param>.qvalue` and `<param>.scale`, of the weight's rank, so plain Orbax
restores them onto any sharding (the scale's target sharding is its weight's, `scale_spec`).
Every other param is stored as in an unquantized checkpoint. The mode is recorded in
`config.json`:

    "quantization_config": {"quant_method": "l4jax", "mode": "int4"}

This module holds what a writer, a reader and a restore need to know about that layout: which
arrays a param is stored as (`stored_arrays`), quantizing a piece while writing
(`quantize_piece`), dequantizing while reading (`dequantize_piece`), and turning restored
`{"qvalue", "scale"}` dicts back into `QArray`s (`as_qarrays`). Only text models are
quantized (the mode's recipes name text-model weights).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from l4jax.convert.mapping import get_path, param_shapes, set_path
from l4jax.errors import CheckpointError, ConfigError
from l4jax.quantization import MODES, QArray, dequantize, quantize_leaf, scale_spec, weight_plan

QUANT_KEY = "quantization_config"
QUANT_METHOD = "l4jax"
FIELDS = ("qvalue", "scale")  # a QArray's arrays, in Orbax's order of its fields

ParamPath = tuple[str, ...]
_quantize_jit = jax.jit(quantize_leaf, static_argnums=(1, 2))


def check_mode(config: Any, mode: str | None) -> None:
    """A ConfigError unless `mode` is None or a mode this `config` can be quantized in."""
    if mode is None:
        return
    if mode not in MODES:
        raise ConfigError(f"quantize={mode!r}: choose one of {', '.join(MODES)}")
    if hasattr(config, "vision"):
        raise ConfigError(
            f"quantize={mode!r}: quantized checkpoints hold a text model; this checkpoint is "
            "multimodal (load it with text_only=True and quantize=, or convert a text model)"
        )


def checkpoint_mode(hf: dict[str, Any], where: Any) -> str | None:
    """The mode an l4jax `config.json` dict records (None: not quantized); a CheckpointError
    naming `where` for a `quantization_config` l4jax did not write."""
    qc = hf.get(QUANT_KEY)
    if qc is None:
        return None
    if (
        not isinstance(qc, dict)
        or qc.get("quant_method") != QUANT_METHOD
        or qc.get("mode") not in MODES
    ):
        raise CheckpointError(
            f"{where}: {QUANT_KEY} {qc!r} is not an l4jax one "
            f"(quant_method {QUANT_METHOD!r}, mode one of {', '.join(MODES)})"
        )
    return qc["mode"]


def config_dict(config: Any, mode: str | None) -> dict[str, Any]:
    """`config.json` of a checkpoint of `config` quantized in `mode`."""
    hf = config.to_hf_dict()
    if mode is not None:
        hf[QUANT_KEY] = {"quant_method": QUANT_METHOD, "mode": mode}
    return hf


def plan(path: ParamPath, config: Any, mode: str | None) -> Any:
    """`weight_plan` of a param path; None (stored as it is) when `mode` is None."""
    return None if mode is None else weight_plan(path, config, mode)


def quantized_struct(path: ParamPath, shape: tuple[int, ...], dtype: Any, config, mode) -> Any:
    """The abstract `QArray` a weight of `shape` is stored as, or None when it is not quantized."""
    p = plan(path, config, mode)
    if p is None:
        return None
    return jax.eval_shape(
        lambda w: quantize_leaf(w, p, mode), jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
    )


def stored_arrays(config: Any, dtype: Any, mode: str | None) -> dict[ParamPath, Any]:
    """Every stored array of a checkpoint: array path -> (shape, numpy dtype). A quantized
    weight at `path` is stored as `path + ("qvalue",)` and `path + ("scale",)`."""
    out: dict[ParamPath, Any] = {}
    for path, shape in param_shapes(config).items():
        q = quantized_struct(path, shape, dtype, config, mode)
        if q is None:
            out[path] = (shape, np.dtype(jnp.dtype(dtype)))
            continue
        for field in FIELDS:
            leaf = getattr(q, field)
            out[path + (field,)] = (tuple(leaf.shape), np.dtype(leaf.dtype))
    return out


def quantize_piece(path: ParamPath, part: np.ndarray, config, mode) -> list[tuple[ParamPath, Any]]:
    """(array path, data) of a piece of param `path` (a layer slice, or some experts of one):
    itself, or its quantized values and scales. Scales never span layers or experts, so
    quantizing piece by piece equals quantizing the whole stack (`l4jax.quantize`)."""
    p = plan(path, config, mode)
    if p is None:
        return [(path, part)]
    q = _quantize_jit(jnp.asarray(part), p, mode)
    return [(path + (field,), np.asarray(getattr(q, field))) for field in FIELDS]


def dequantize_piece(qvalue: np.ndarray, scale: np.ndarray, dtype: Any) -> np.ndarray:
    """A stored piece's weights, q * scale in fp32 then `dtype` (`l4jax.quantization`)."""
    return np.asarray(dequantize(QArray(jnp.asarray(qvalue), jnp.asarray(scale)), dtype))


def as_qarrays(params: dict[str, Any], config: Any, mode: str | None) -> dict[str, Any]:
    """Restored params with each quantized weight's `{"qvalue", "scale"}` dict a `QArray`."""
    if mode is None:
        return params
    for path in param_shapes(config):
        if plan(path, config, mode) is not None:
            stored = get_path(params, path)
            set_path(params, path, QArray(*(stored[field] for field in FIELDS)))
    return params


def scale_sharding(sharding: Any, q: Any) -> Any:
    """The sharding of a weight's scale given the weight's (`QArray` `q` of shapes): the same
    mesh axes, except on the scale's size-1 dims."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, scale_spec(sharding.spec, q))
    return sharding


def qarray_sharding(sharding: Any, q: Any) -> QArray:
    """A quantized weight's sharding as a `QArray` of two (values', scale's): given as one (the
    weight's; its scale's follows, `scale_sharding`) or already as two."""
    if isinstance(sharding, QArray):
        return sharding
    return QArray(sharding, scale_sharding(sharding, q))


def place_param(w: Any, sharding: Any) -> Any:
    """`jax.device_put` of a param; a `QArray`'s scale is placed like its values
    (`qarray_sharding`). Loaders place quantized and plain params through this one function."""
    if isinstance(w, QArray):
        s = qarray_sharding(sharding, w)
        return QArray(*(jax.device_put(getattr(w, f), getattr(s, f)) for f in FIELDS))
    return jax.device_put(w, sharding)
