"""Hugging Face FP8 checkpoints as Meta released Maverick: compressed-tensors "float-quantized".

The layout (`meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8`): `config.json` has a
`quantization_config` with `quant_method` "compressed-tensors", `format` "float-quantized",
config groups whose weights are 8-bit floats with one scale per output channel
(`strategy` "channel"), and an `ignore` list of modules kept in bf16 (attention, routers,
shared experts, dense layers, the vision tower, `lm_head`). Routed experts are stored unfused,
one Linear per expert and projection:

    language_model.model.layers.{i}.feed_forward.experts.{e}.gate_proj.weight        F8_E4M3 [F, D]
    language_model.model.layers.{i}.feed_forward.experts.{e}.gate_proj.weight_scale  [F, 1]
    ... up_proj (as gate_proj), down_proj [D, F] with weight_scale [D, 1]

`FP8Source` reads such a checkpoint as the HF tensor source the mapping table expects (fused
`experts.gate_up_proj` / `experts.down_proj` names), and `fill_fp8` copies each expert's
float8 values and scales straight into the `fp8` params (`l4jax.quantization`: float8_e4m3fn
[E, K, N] with fp32 scales [E, 1, N], the same per-output-channel format), one expert at a
time: no weight of the model is upcast. Which tensors are quantized is read from the stored
dtypes (the `ignore` list names the others); a routed expert stored in bf16 is quantized with
l4jax's fp8 recipe, any other float8 tensor is dequantized (q * scale) when read.
"""

from __future__ import annotations

import re
from typing import Any

import ml_dtypes
import numpy as np

from l4jax.convert.hf import HFCheckpoint, StreamingHF
from l4jax.convert.mapping import Entry
from l4jax.errors import CheckpointError
from l4jax.quantization import QArray, write_slice

EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(gate|up|down)_proj\.weight$"
)
SCALE_SUFFIX = "_scale"  # X.weight_scale: the per-channel scales of X.weight
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


class FP8Source:
    """A compressed-tensors FP8 `HFCheckpoint` read under the mapping table's names."""

    fp8 = True

    def __init__(self, ckpt: HFCheckpoint):
        self._ckpt = ckpt
        self._raw = StreamingHF(ckpt)  # (safetensors' numpy reader has no float8)
        self.path = ckpt.path
        self.hf_config, self.unused_keys, self.unaccounted = (
            ckpt.hf_config,
            ckpt.unused_keys,
            ckpt.unaccounted,
        )
        stored = set(ckpt.keys())
        self._experts: dict[tuple[int, str], dict[int, str]] = {}  # (layer, proj) -> e -> key
        self._plain: list[str] = []
        for key in ckpt.keys():
            match = EXPERT.match(key)
            if match:
                layer, e, proj = int(match[1]), int(match[2]), match[3]
                self._experts.setdefault((layer, proj), {})[e] = key
            elif not (
                key.endswith(".weight" + SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] in stored
            ):
                self._plain.append(key)
        self._fused: dict[str, int] = {}
        for (layer, proj), experts in sorted(self._experts.items()):
            missing = sorted(set(range(max(experts) + 1)) - set(experts))
            if missing:
                key = f"model.layers.{layer}.feed_forward.experts.{missing[0]}.{proj}_proj.weight"
                raise CheckpointError(f"{self.path}: missing tensor {key!r} (unfused experts)")
            name = "down_proj" if proj == "down" else "gate_up_proj"
            self._fused[f"model.layers.{layer}.feed_forward.experts.{name}"] = layer
        for key in [k for keys in self._experts.values() for k in keys.values()] + self._plain:
            if self._raw.dtype(key) == FP8 and key + SCALE_SUFFIX not in stored:
                raise CheckpointError(f"{ckpt.location(key)}: float8 tensor {key!r} has no scale")

    def keys(self) -> list[str]:
        return self._plain + list(self._fused)

    def location(self, key: str) -> str:
        if key in self._fused:
            key = self._expert_keys(key)[0][0]
        return self._ckpt.location(key)

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._fused:
            return self._ckpt.shape(key)
        projs = self._expert_keys(key)
        out, k = self._ckpt.shape(projs[0][0])  # [out, in] of one expert's Linear
        return (len(projs[0]), k, out * len(projs))

    def _expert_keys(self, fused: str) -> list[list[str]]:
        """Per projection of a fused tensor (gate and up, or down), its experts' keys."""
        layer = self._fused[fused]
        projs = ("down",) if fused.endswith("down_proj") else ("gate", "up")
        return [
            [self._experts[(layer, p)][e] for e in range(len(self._experts[(layer, p)]))]
            for p in projs
        ]

    def expert(self, key: str) -> tuple[np.ndarray, np.ndarray | None]:
        """One expert's stored Linear weight [out, in] and its scales [out, 1] (fp32), or None
        when it is stored unquantized."""
        weight = self._raw.get(key)
        if weight.dtype != FP8:
            return weight, None
        return weight, self._raw.get(key + SCALE_SUFFIX).astype(np.float32).reshape(-1, 1)

    def get(self, key: str) -> np.ndarray:
        """A tensor in HF layout; float8 ones dequantized to fp32 (fused experts: one layer's)."""
        if key in self._fused:
            parts = [
                np.stack([_dequantized(*self.expert(k)).T for k in keys])
                for keys in self._expert_keys(key)
            ]
            return np.concatenate(parts, axis=-1)
        weight = self._raw.get(key)
        if weight.dtype != FP8:
            return weight
        return _dequantized(weight, self._raw.get(key + SCALE_SUFFIX).astype(np.float32))

    def is_fused(self, key: str) -> bool:
        return key in self._fused

    def fill_fp8(self, entry: Entry, host: dict[tuple[str, ...], Any], config: Any) -> None:
        """Write fused expert tensor `entry`'s slots (fp8 `QArray` host buffers) expert by
        expert: a float8 expert's values (transposed to [in, out]) and scales as stored, a bf16
        one quantized with l4jax's fp8 recipe."""
        for slot, keys in zip(entry.slots, self._expert_keys(entry.hf_key), strict=True):
            buffer = host[slot.path]
            if not isinstance(buffer, QArray):
                raise CheckpointError(f"{entry.hf_key}: not an fp8 param")
            for e, key in enumerate(keys):
                weight, scale = self.expert(key)
                if scale is None:
                    w = weight.T.astype(np.float32)
                    write_slice(buffer, (slot.group, e), w, slot.path, config, "fp8")
                    continue
                buffer.qvalue[slot.group, e] = weight.T
                buffer.scale[slot.group, e] = scale.T

    def close(self) -> None:
        self._ckpt.close()


def _dequantized(weight: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """q * scale in fp32 (exact: e4m3 has 4 significant bits), or the weight itself."""
    if scale is None:
        return weight
    return weight.astype(np.float32) * scale
