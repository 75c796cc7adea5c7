"""`from_pretrained`: a checkpoint directory in, `(model, params)` out."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from l4jax.config import Llama4Config
from l4jax.convert.hf import HFCheckpoint, is_hf_dir
from l4jax.convert.mapping import (
    Entry,
    TensorSource,
    check_source,
    entry_shapes,
    hf_entries,
    iter_slices,
    set_path,
)
from l4jax.convert.orbax import L4jaxCheckpoint, is_l4jax_dir, restore_params
from l4jax.errors import CheckpointError, ConfigError
from l4jax.model import Llama4ForCausalLM
from l4jax.quantization import MODES, host_buffer, write_slice
from l4jax.quantization import quantize as quantize_params

log = logging.getLogger(__name__)


def open_checkpoint(path: str | os.PathLike) -> TensorSource:
    """Detect the format of `path` and open it as a tensor source (HF names and layouts)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if is_l4jax_dir(p):
        return L4jaxCheckpoint(p)
    if is_hf_dir(p):
        return HFCheckpoint(p)
    if (p / "params.json").is_file():
        from l4jax.convert.meta import MetaCheckpoint

        return MetaCheckpoint(p)
    raise CheckpointError(
        f"{p}: unknown checkpoint format (expected config.json + *.safetensors from Hugging Face, "
        "or params.json + consolidated.NN.pth from Meta, or config.json + params/ from l4jax)"
    )


def source_config(source: Any, **runtime: Any) -> Llama4Config:
    try:
        return Llama4Config.from_hf_dict(source.hf_config(), **runtime)
    except ValueError as e:
        raise CheckpointError(f"{getattr(source, 'path', '')}: {e}") from None


def load_params(
    source: TensorSource, config: Llama4Config, dtype: Any = None, quantize: str | None = None
) -> dict[str, Any]:
    """Read every tensor once into the scanned l4jax param tree (host RAM, then device);
    with `quantize` (`l4jax.quantization.MODES`), its weights quantized layer by layer."""
    dtype = dtype or config.param_dtype
    return load_entries(source, hf_entries(config), dtype, config, quantize)


def load_entries(
    source: TensorSource,
    entries: list[Entry],
    dtype: Any,
    config: Llama4Config | None = None,
    quantize: str | None = None,
) -> dict[str, Any]:
    """Read the tensors of `entries` once into their param tree (host RAM, then device).

    With `quantize`, a weight it quantizes is held on the host only quantized: each layer's
    slice is quantized as it is read, so host memory peaks at the quantized model plus one
    tensor, not the model in `dtype`."""
    check_source(source, None, entries)
    target = np.dtype(jnp.dtype(dtype))
    host: dict[tuple[str, ...], Any] = {
        path: np.empty(shape, target)
        if quantize is None
        else host_buffer(path, shape, target, config, quantize)
        for path, shape in entry_shapes(entries).items()
    }
    slices = iter_slices(source, entries, target)
    total = sum(len(e.slots) for e in entries)
    for slot, array in tqdm(
        slices,
        total=total,
        desc="loading",
        unit="tensor",
        leave=False,
        disable=not sys.stderr.isatty(),
    ):
        index = ... if slot.group is None else slot.group
        if quantize is None:
            host[slot.path][index] = array
        else:
            write_slice(host[slot.path], index, array, slot.path, config, quantize)
    params: dict[str, Any] = {}
    for path, array in host.items():
        set_path(params, path, jax.device_put(array))
    return params


def from_pretrained(
    path: str | os.PathLike,
    dtype: Any = None,
    text_only: bool = False,
    quantize: str | None = None,
    **runtime: Any,
) -> tuple[Any, dict[str, Any]]:
    """Load a Hugging Face or Meta Llama 4 checkpoint as `(model, params)`.

    `dtype` sets the stored param dtype and the compute dtype (default: the checkpoint's
    `torch_dtype`, else float32); other `Llama4Config` runtime fields (e.g. `moe_impl`,
    `remat_policy`) pass through `runtime`. A multimodal checkpoint (HF `vision_config`, Meta
    `vision_args`, l4jax `vision_config`) gives `l4jax.vision.Llama4ForConditionalGeneration`,
    or with `text_only` the text model `Llama4ForCausalLM` (its vision tensors are not read).
    An l4jax checkpoint (`l4jax convert`) is restored with Orbax (`restore_params`).
    `quantize` (int4, int8, fp8: `l4jax.quantize`) quantizes the text model's weights, layer by
    layer while reading a Hugging Face or Meta checkpoint (docs/quantization.md).
    """
    if quantize is not None and quantize not in MODES:
        raise ConfigError(f"quantize={quantize!r}: choose one of {', '.join(MODES)}")
    if is_l4jax_dir(path):
        config, params = restore_params(path, dtype=dtype, text_only=text_only, **runtime)
        if not hasattr(config, "vision"):
            if quantize is not None:
                params = quantize_params(params, config, quantize)
            return Llama4ForCausalLM(config), params
        _text_only_quantize(path, quantize)
        from l4jax.vision import Llama4ForConditionalGeneration

        return Llama4ForConditionalGeneration(config), params
    if not text_only:
        from l4jax.convert.multimodal import is_multimodal, load_multimodal

        if is_multimodal(path):
            _text_only_quantize(path, quantize)
            return load_multimodal(path, dtype, **runtime)
    source = open_checkpoint(path)
    hf = source.hf_config()
    text = hf.get("text_config", hf)
    name = str(jnp.dtype(dtype)) if dtype is not None else _torch_dtype(text)
    runtime = {"dtype": name, "param_dtype": name, **runtime}
    config = source_config(source, **runtime)
    log.info(
        "loading %s (%d layers) from %s", type(source).__name__, config.num_hidden_layers, path
    )
    params = load_params(source, config, quantize=quantize)
    return Llama4ForCausalLM(config), params


def _text_only_quantize(path: Any, quantize: str | None) -> None:
    if quantize is not None:
        raise ConfigError(
            f"{path}: quantize={quantize!r} quantizes the text model of a multimodal "
            "checkpoint: load it with text_only=True"
        )


def _torch_dtype(hf: dict[str, Any]) -> str:
    name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"
