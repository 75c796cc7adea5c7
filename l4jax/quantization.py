"""Weight quantization: Meta's int4 and fp8 recipes and per-channel int8, as small pytrees.

    params_q = l4jax.quantize(params, config, "int4")   # same tree, some leaves now `QArray`s
    logits = Llama4ForCausalLM(config).apply({"params": params_q}, tokens)

A quantized weight is a `QArray(qvalue, scale)`: the quantized values and their fp32 scales,
both of the weight's rank, so they keep the weight's logical axis names (`logical_axes`), shard
with it, slice with it under the layer scan and expert parallelism, and save with Orbax as two
arrays. The storage dtype of `qvalue` names the format:

    int8            int8: symmetric, one scale per output channel (max|w| over the contraction
                    axes times fp32(1/127)); scale dims of size 1 on the contraction axes.
    int4 (uint8)    Meta's `int4_mixed` (llama_models `quantize_impls.int4_row_quantize`):
                    groups of 128 along the contraction axis (-2), scale = max(max|w|, 1e-6) / 8,
                    q = round(w / scale) half to even, clamped to [-8, 7]. Two values per byte:
                    in each group the low nibble holds row j and the high nibble row j + 64, so a
                    group unpacks by one concatenation (Meta interleaves pairs instead; the
                    values are the same). jnp.int4 is not used: XLA:CPU stores it one byte per
                    value (measured: `jnp.zeros(2**20, jnp.int4).nbytes == 2**20`).
    fp8             float8_e4m3fn with one fp32 scale per output channel, as fbgemm's
                    `quantize_fp8_per_row` that Meta's `fp8_mixed` uses: scale = max(max|w|,
                    1e-12) / 448, q = clip(w * (448 / max|w|), -448, 448) rounded to e4m3.

Which weights each mode quantizes (`quantize`):

    int4   routed and shared experts of MoE layers (Meta's `int4_mixed`); the rest stays.
    int8   every linear weight (attention, dense MLPs, experts, shared experts, lm_head) except
           the router, whose fp32 logits pick the experts; embeddings and norms stay.
    fp8    routed experts of MoE layers (Meta's `fp8_mixed`), activations stay in the compute
           dtype. Meta's recipe also keeps the first and the last layer in bf16; a scanned layer
           stack holds one dtype per weight for all its layers, so here they are fp8 too.

`QArray.astype(dtype)` dequantizes, so dense layers (`w.astype(x.dtype)` before an einsum)
take quantized weights unchanged and XLA fuses the convert into the matmul; the MoE backends
hand the `QArray` itself to the grouped matmuls (`l4jax.moe`), which dequantize one expert
block or tile at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from l4jax.config import Llama4Config

log = logging.getLogger(__name__)
Array = jax.Array
MODES = ("int8", "int4", "fp8")
INT4_GROUP = 128  # Meta's group size along the contraction dim
INT4_MIN, INT4_MAX = -8, 7
INT8_MAX = 127
FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn

EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized array, a weight or an int8 KV cache (`l4jax.kv_cache`): `qvalue` (int8,
    packed-int4 uint8 or float8_e4m3fn) and fp32 `scale` of the same rank. `shape` is the
    array's (unpacked) shape; `astype` dequantizes."""

    qvalue: Array
    scale: Array

    @property
    def mode(self) -> str:
        return {"int8": "int8", "uint8": "int4", "float8_e4m3fn": "fp8"}[self.qvalue.dtype.name]

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.qvalue.shape)
        if self.mode == "int4":  # two values per byte along the contraction axis (-2)
            shape = (*shape[:-2], 2 * shape[-2], shape[-1])
        return shape

    @property
    def ndim(self) -> int:
        return len(self.qvalue.shape)

    def __getitem__(self, index: Any) -> QArray:
        """Indexes leading axes (layers, experts): never the last two."""
        return QArray(self.qvalue[index], self.scale[index])

    def astype(self, dtype: Any) -> Array:
        return dequantize(self, dtype)


def as_dense(w: Array | QArray, dtype: Any) -> Array:
    """`w` in `dtype`, dequantized if it is a `QArray`."""
    return w.astype(dtype)


def keep_quantized(w: Array | QArray, dtype: Any) -> Array | QArray:
    """`w` cast to `dtype`, except a `QArray`, which stays quantized (for the grouped matmuls)."""
    return w if isinstance(w, QArray) else w.astype(dtype)


# ---- formats ----------------------------------------------------------------------------------


def divide(w: Array, scale: Array) -> Array:
    """w / scale, correctly rounded as in torch. XLA rewrites a division by a broadcast into a
    multiplication by the reciprocal (measured: ~30% of quotients 1 ulp off, which moves values
    that sit at x.5 to the other integer), so the scale is broadcast behind a barrier first."""
    return w / jax.lax.optimization_barrier(jnp.broadcast_to(scale, w.shape))


def quantize_int8(w: Array, contract_axes: tuple[int, ...]) -> QArray:
    """Symmetric int8, one scale per output channel (every axis but `contract_axes`)."""
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=contract_axes, keepdims=True)
    # times the fp32 reciprocal, which is what XLA makes of a division by the constant 127
    scale = jnp.maximum(amax, 1e-6) * jnp.float32(1 / INT8_MAX)
    q = jnp.clip(jnp.round(divide(w32, scale)), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return QArray(q, scale)


def quantize_fp8(w: Array, contract_axes: tuple[int, ...]) -> QArray:
    """float8_e4m3fn with one fp32 scale per output channel (fbgemm `quantize_fp8_per_row`)."""
    w32 = w.astype(jnp.float32)
    amax = jnp.maximum(jnp.max(jnp.abs(w32), axis=contract_axes, keepdims=True), 1e-12)
    inv_scale = FP8_MAX / amax
    q = jnp.clip(w32 * inv_scale, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
    return QArray(q, 1.0 / inv_scale)


def int4_group_size(k: int) -> int:
    """128 (Meta's) when it divides the contraction dim `k`; else the largest even divisor of
    `k` below 128 (only tiny test models have such dims)."""
    for g in range(INT4_GROUP, 1, -2):
        if k % g == 0:
            return g
    raise ValueError(f"int4: contraction dim {k} has no even group size")


def quantize_int4(w: Array) -> QArray:
    """Meta's `int4_row_quantize` along axis -2 ([..., K, N]), packed two per byte."""
    *lead, k, n = w.shape
    g = int4_group_size(k)
    w32 = w.astype(jnp.float32).reshape(*lead, k // g, g, n)
    scale = jnp.maximum(jnp.max(jnp.abs(w32), axis=-2, keepdims=True), 1e-6) / 8  # [.., K/g, 1, N]
    q = jnp.clip(jnp.round(divide(w32, scale)), INT4_MIN, INT4_MAX).astype(jnp.int8)
    low, high = q[..., : g // 2, :], q[..., g // 2 :, :]
    packed = (low & 0xF).astype(jnp.uint8) | ((high & 0xF).astype(jnp.uint8) << 4)
    return QArray(packed.reshape(*lead, k // 2, n), scale.reshape(*lead, k // g, n))


def unpack_int4(packed: Array, group_size: int) -> Array:
    """uint8 [..., K/2, N] -> int8 [..., K, N] (the layout of `quantize_int4`)."""
    *lead, half, n = packed.shape
    p = packed.reshape(*lead, half * 2 // group_size, group_size // 2, n)
    low = ((p & 0xF) ^ 8).astype(jnp.int8) - 8  # 4-bit two's complement -> int8
    high = ((p >> 4) ^ 8).astype(jnp.int8) - 8
    return jnp.concatenate([low, high], axis=-2).reshape(*lead, half * 2, n)


def dequantize(w: QArray, dtype: Any) -> Array:
    """q * scale in fp32 (exact: |q| <= 448 and the scale is fp32), then `dtype`."""
    if w.mode == "int4":
        k = 2 * w.qvalue.shape[-2]
        g = k // w.scale.shape[-2]
        q = unpack_int4(w.qvalue, g).astype(jnp.float32)
        scale = jnp.repeat(w.scale, g, axis=-2)
    else:
        q, scale = w.qvalue.astype(jnp.float32), w.scale
    return (q * scale).astype(dtype)


def nbytes(tree: Any) -> int:
    """Bytes of every array leaf (abstract or concrete) of a parameter tree."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ---- recipes ----------------------------------------------------------------------------------


def _key_name(entry: Any) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def weight_plan(path: tuple[str, ...], config: Llama4Config, mode: str) -> Any:
    """How the weight at `path` (a leaf of the text model's params) is quantized in `mode`:
    None (kept), "int4", or the contraction axes (int8/fp8), counted from the end so that the
    plan holds for the layer stack and for one layer's slice of it alike."""
    name = path[-1]
    in_layers = path[0] == "layers"
    slot = next((p for p in path if p.startswith("layer_")), None)
    is_moe_ffn = (
        in_layers
        and slot is not None
        and "feed_forward" in path
        and config.layer_kinds[int(slot.split("_")[1])].is_moe
    )
    routed = is_moe_ffn and path[-2] == "feed_forward" and name in EXPERT_NAMES
    shared = is_moe_ffn and "shared_expert" in path and name in EXPERT_NAMES
    if mode == "int4":
        return "int4" if routed or shared else None
    if mode == "fp8":
        return (-2,) if routed else None
    if mode != "int8":
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {MODES}")
    if in_layers and name in EXPERT_NAMES:  # routed, shared and dense MLP: [.., K, N]
        return (-2,)
    if in_layers and name in ("q_proj", "k_proj", "v_proj"):  # [.., D, heads, H]
        return (-3,)
    if in_layers and name == "o_proj":  # [.., N, H, D]
        return (-3, -2)
    if path == ("lm_head",):  # [D, V]
        return (-2,)
    return None


def quantize_leaf(w: Array, plan: Any, mode: str) -> Array | QArray:
    if plan is None:
        return w
    if plan == "int4":
        return quantize_int4(w)
    return (quantize_int8 if mode == "int8" else quantize_fp8)(w, plan)


_quantize_leaf_jit = jax.jit(quantize_leaf, static_argnums=(1, 2))


def quantize_logged(params: Any, config: Llama4Config, mode: str | None) -> Any:
    """`quantize`, logging the bytes before and after; `mode=None` returns `params`."""
    if mode is None:
        return params
    before = nbytes(params)
    params = quantize(params, config, mode)
    log.info("quantized to %s: %.1f MB -> %.1f MB", mode, before / 1e6, nbytes(params) / 1e6)
    return params


def quantize(params: Any, config: Llama4Config, mode: str) -> Any:
    """The text model's `params` with the weights of `mode` (see the module docstring) replaced
    by `QArray`s; other leaves are returned as they are. Works leaf by leaf (one jit each), so
    peak memory is the input plus one quantized leaf; traceable (`jax.eval_shape`) too."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {MODES}")

    def one(path: Any, w: Any) -> Any:
        names = tuple(_key_name(p) for p in path)
        plan = weight_plan(names, config, mode)
        if plan is None or isinstance(w, QArray):
            return w
        return _quantize_leaf_jit(w, plan, mode)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_qarray)


# ---- streaming (checkpoint loading: one layer's slice at a time) -------------------------------


def host_buffer(path: tuple[str, ...], shape: tuple[int, ...], dtype: Any, config, mode: str):
    """The numpy buffer a leaf at `path` of `shape` is loaded into: an array, or a `QArray` of
    arrays when `mode` quantizes it (fill it with `write_slice`)."""
    plan = weight_plan(path, config, mode)
    if plan is None:
        return np.empty(shape, dtype)
    out = jax.eval_shape(lambda w: quantize_leaf(w, plan, mode), jax.ShapeDtypeStruct(shape, dtype))
    return QArray(
        np.empty(out.qvalue.shape, out.qvalue.dtype), np.empty(out.scale.shape, out.scale.dtype)
    )


def write_slice(buffer: Any, index: Any, array: np.ndarray, path, config, mode: str) -> None:
    """buffer[index] = array, quantized first (one layer's slice) if `buffer` is a `QArray`.
    Scales never span layers, so quantizing slice by slice equals quantizing the stack."""
    if not isinstance(buffer, QArray):
        buffer[index] = array
        return
    q = _quantize_leaf_jit(jnp.asarray(array), weight_plan(path, config, mode), mode)
    buffer.qvalue[index] = np.asarray(q.qvalue)
    buffer.scale[index] = np.asarray(q.scale)


def _is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)


def quantized_leaves(params: Any) -> list[tuple[str, QArray]]:
    """("a/b/c", QArray) for every quantized weight of `params`."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_qarray)[0]
    return [
        ("/".join(_key_name(p) for p in path), leaf)
        for path, leaf in flat
        if isinstance(leaf, QArray)
    ]


# ---- sharding ---------------------------------------------------------------------------------


def scale_spec(spec: PartitionSpec, w: QArray) -> PartitionSpec:
    """The spec of `w.scale` given its weight's spec: the same, except dims where the scale has
    size 1 (per-channel scales' contraction dims), which cannot be split."""
    entries = tuple(spec) + (None,) * (w.ndim - len(spec))
    return PartitionSpec(
        *(None if size == 1 else entry for entry, size in zip(entries, w.scale.shape))
    )


def spec_like(w: Array | QArray, spec: PartitionSpec) -> PartitionSpec | QArray:
    """A weight's spec (logical or mesh), as a `QArray` of specs if `w` is quantized."""
    if isinstance(w, QArray):
        return QArray(spec, scale_spec(spec, w))
    return spec


def logical_axes(axes: Any, params: Any) -> Any:
    """The logical axes of quantized `params` (`QArray` leaves), from the unquantized tree's
    `axes` (`model.param_logical_axes`): values and scales keep their weight's names."""

    def one(spec: Any, w: Any) -> Any:
        return spec_like(w, spec)

    return jax.tree.map(one, axes, params, is_leaf=lambda x: isinstance(x, PartitionSpec))
