"""Hugging Face checkpoint directories: `config.json` + `*.safetensors` (single or indexed).

`HFCheckpoint` reads one tensor at a time (safetensors memory-maps the files), under the
text model's names: the `language_model.` prefix of multimodal checkpoints is stripped and the
vision tower's tensors are set aside in `unused_keys()`. `HFMultimodalCheckpoint` reads every
tensor under its stored name; `StreamingHF` reads either with positioned reads, for streaming
conversion.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from l4jax.config import Llama4Config
from l4jax.convert import hostmem
from l4jax.convert.mapping import TEXT_PREFIX
from l4jax.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
NON_TEXT_PREFIXES = ("vision_model.", "multi_modal_projector.")


def is_hf_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def fp8_scheme(config_file: Any, hf: dict[str, Any]) -> bool:
    """True for a compressed-tensors "float-quantized" config of 8-bit float weights with
    per-channel scales; False without a `quantization_config`; a CheckpointError naming any
    other scheme (this reader knows no other)."""
    qc = hf.get("quantization_config") or hf.get("text_config", {}).get("quantization_config")
    if not qc:
        return False
    method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
    fmt = qc.get("format", "") if isinstance(qc, dict) else ""
    groups = qc.get("config_groups") if isinstance(qc, dict) else None
    weights = [g.get("weights") for g in groups.values()] if isinstance(groups, dict) else []
    supported = (
        method == "compressed-tensors"
        and fmt == "float-quantized"
        and bool(weights)
        and all(
            isinstance(w, dict)
            and w.get("type") == "float"
            and w.get("num_bits") == 8
            and w.get("strategy") == "channel"
            for w in weights
        )
    )
    if not supported:
        what = f"quant_method {method!r}" + (f", format {fmt!r}" if fmt else "")
        raise CheckpointError(
            f"{config_file}: quantization_config ({what}) is not supported: l4jax reads "
            "compressed-tensors 'float-quantized' checkpoints with 8-bit float weights and "
            "per-channel scales (Maverick's FP8 release); load a bf16 checkpoint with "
            "from_pretrained(path, quantize='fp8' | 'int4' | 'int8') instead"
        )
    return True


class HFCheckpoint:
    """A HF Llama 4 checkpoint directory, read lazily tensor by tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{config_file}: missing (not a Hugging Face checkpoint)")
        with open(config_file) as f:
            try:
                self._hf_config: dict[str, Any] = json.load(f)
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
        # a compressed-tensors FP8 checkpoint (`hf_fp8.FP8Source` reads it); others raise
        self.fp8 = fp8_scheme(config_file, self._hf_config)
        self._handles: dict[str, Any] = {}
        self._unaccounted: list[str] = []  # tensors and files the index does not account for
        self._files = self._tensor_files()
        self._where: dict[str, tuple[str, str]] = {}  # text key -> (file, stored key)
        self._unused: list[str] = []
        for file, stored_keys in self._files.items():
            for stored in stored_keys:
                key = stored[len(TEXT_PREFIX) :] if stored.startswith(TEXT_PREFIX) else stored
                if stored.startswith(NON_TEXT_PREFIXES):
                    self._unused.append(stored)
                else:
                    self._where[key] = (file, stored)

    def _tensor_files(self) -> dict[str, list[str]]:
        """file name -> stored tensor names. Every `*.safetensors` file is opened: with an
        index, a tensor the index lists but its file lacks is an error, and tensors or files
        the index does not name are `unaccounted()`; without one, a name in two files is."""
        found = sorted(p.name for p in self.path.glob("*.safetensors"))
        index = self.path / INDEX_FILE
        if not index.is_file():
            if not found:
                raise CheckpointError(f"{self.path}: no *.safetensors files")
            files = {file: list(self._open(file).keys()) for file in found}
            seen: dict[str, str] = {}
            for file, keys in files.items():
                for key in keys:
                    if key in seen:
                        raise CheckpointError(
                            f"{self.path / file}: tensor {key!r} is also in {seen[key]}"
                        )
                    seen[key] = file
            return files
        with open(index) as f:
            try:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: malformed index ({e})") from None
        files: dict[str, list[str]] = {}
        for key, file in weight_map.items():
            files.setdefault(file, []).append(key)
        for file, keys in files.items():
            if not (self.path / file).is_file():
                raise CheckpointError(f"{self.path / file}: listed in {INDEX_FILE}, missing")
            stored = set(self._open(file).keys())
            absent = [key for key in keys if key not in stored]
            if absent:
                more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
                raise CheckpointError(
                    f"{self.path / file}: no tensor {absent[0]!r}{more}, which {INDEX_FILE} "
                    "places in this file"
                )
            listed = set(keys)
            self._unaccounted += [
                f"{self.path / file}: tensor {key!r} (not in {INDEX_FILE})"
                for key in sorted(stored - listed)
            ]
        for file in found:
            if file not in files:
                count = len(self._open(file).keys())
                self._unaccounted.append(
                    f"{self.path / file}: {count} tensor(s) in a file {INDEX_FILE} does not name"
                )
        return files

    def _open(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.path / file), framework="numpy")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(
                    f"{self.path / file}: unreadable safetensors file ({e})"
                ) from None
        return self._handles[file]

    def hf_config(self) -> dict[str, Any]:
        return self._hf_config

    def config(self, **runtime: Any) -> Llama4Config:
        try:
            return Llama4Config.from_hf_dict(self._hf_config, **runtime)
        except ValueError as e:
            raise CheckpointError(f"{self.path / 'config.json'}: {e}") from None

    def keys(self) -> list[str]:
        return list(self._where)

    def unused_keys(self) -> list[str]:
        return list(self._unused)

    def unaccounted(self) -> list[str]:
        """Tensors present that no loader will read, each "FILE: what" (see `check_source`)."""
        return list(self._unaccounted)

    def location(self, key: str) -> str:
        file, _ = self._where.get(key, ("?", key))
        return str(self.path / file)

    def shape(self, key: str) -> tuple[int, ...]:
        file, stored = self._where[key]
        try:
            return tuple(self._open(file).get_slice(stored).get_shape())
        except SafetensorError as e:
            raise CheckpointError(f"{self.path / file}: tensor {key!r}: {e}") from None

    def get(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise CheckpointError(f"{self.path}: no tensor {key!r}")
        file, stored = self._where[key]
        try:
            return self._open(file).get_tensor(stored)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.path / file}: tensor {key!r} unreadable ({e})") from None

    def close(self) -> None:
        self._handles.clear()


class HFMultimodalCheckpoint(HFCheckpoint):
    """A HF multimodal checkpoint read under its stored names, vision tensors included."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._where = {key: (file, key) for file, keys in self._files.items() for key in keys}
        self._unused = []


_SAFETENSORS_NUMPY = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
}


class StreamingHF:
    """`HFCheckpoint`'s tensors read with positioned reads (`os.preadv`) into fresh arrays.

    safetensors' own reader memory-maps each file (every page a read touches stays in RSS while
    the handle is open) and slices element-wise. A safetensors tensor is one C-ordered byte
    range and its leading rows a contiguous part of it, so reading exactly those bytes keeps
    host memory at what was asked for, at page-cache speed. (Files were validated by
    `HFCheckpoint` through safetensors when the source was checked.)
    """

    def __init__(self, ckpt: HFCheckpoint):
        self._ckpt = ckpt
        self.path = ckpt.path
        self.hf_config, self.keys, self.unused_keys = ckpt.hf_config, ckpt.keys, ckpt.unused_keys
        self.location, self.shape, self.unaccounted = ckpt.location, ckpt.shape, ckpt.unaccounted
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}

    def dtype(self, key: str) -> np.dtype:
        return self._info(key)[2]

    def get(self, key: str) -> np.ndarray:
        return self._read(key, None)

    def get_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        return self._read(key, (start, stop))

    def _read(self, key: str, rows: tuple[int, int] | None) -> np.ndarray:
        file, offset, dtype, shape = self._info(key)
        if rows is not None:
            offset += rows[0] * math.prod(shape[1:]) * dtype.itemsize
            shape = (rows[1] - rows[0], *shape[1:])
        out = hostmem.empty(shape, dtype)
        try:
            hostmem.pread(file, out, offset)
        except OSError as e:
            raise CheckpointError(f"{file}: tensor {key!r} unreadable ({e})") from None
        return out

    def _info(self, key: str) -> tuple[str, int, np.dtype, tuple[int, ...]]:
        """(file, byte offset of the tensor in it, dtype, shape)."""
        file = self.location(key)
        data_start, header = self._header(file)
        info = header.get(key) or header.get(TEXT_PREFIX + key)
        if info is None or info.get("dtype") not in _SAFETENSORS_NUMPY:
            what = "missing" if info is None else f"of dtype {info.get('dtype')}"
            raise CheckpointError(f"{file}: tensor {key!r} {what}")
        return (
            file,
            data_start + info["data_offsets"][0],
            _SAFETENSORS_NUMPY[info["dtype"]],
            tuple(info["shape"]),
        )

    def _header(self, file: str) -> tuple[int, dict[str, Any]]:
        if file not in self._headers:
            try:
                with open(file, "rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    self._headers[file] = (8 + size, json.loads(f.read(size)))
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{file}: unreadable safetensors header ({e})") from None
        return self._headers[file]

    def close(self) -> None:
        self._ckpt.close()
