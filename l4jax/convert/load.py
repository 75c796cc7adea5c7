"""`from_pretrained`: a checkpoint directory in, `(model, params)` out.

The format is detected once (`formats.detect_format`); an l4jax checkpoint is restored with
Orbax (`restore_params`), a Hugging Face or Meta one is read tensor by tensor through the
mapping table into the scanned param tree, with its vision tower when it is multimodal.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from l4jax.config import Llama4Config
from l4jax.convert.formats import detect_format, open_checkpoint, source_config
from l4jax.convert.mapping import (
    Entry,
    TensorSource,
    check_source,
    entry_shapes,
    hf_entries,
    iter_slices,
    multimodal_entries,
    set_path,
)
from l4jax.convert.orbax import restore_params
from l4jax.errors import ConfigError
from l4jax.model import Llama4ForCausalLM
from l4jax.quantization import MODES, host_buffer, quantized_leaves, write_slice
from l4jax.quantization import quantize as quantize_params
from l4jax.vision import Llama4ForConditionalGeneration
from l4jax.vision_config import checkpoint_dtype

log = logging.getLogger(__name__)


def read_params(
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
    if quantize == "fp8" and getattr(source, "fp8", False):  # float8 experts copied as stored
        direct = [e for e in entries if source.is_fused(e.hf_key)]
        for entry in direct:
            source.fill_fp8(entry, host, config)
        entries = [e for e in entries if e not in direct]
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
    """Load a Hugging Face, Meta or l4jax Llama 4 checkpoint as `(model, params)`.

    `dtype` sets the stored param dtype and the compute dtype (default: the checkpoint's
    `torch_dtype`, else float32); other `Llama4Config` runtime fields (e.g. `moe_impl`,
    `remat_policy`) pass through `runtime`. A multimodal checkpoint (HF `vision_config`, Meta
    `vision_args`, l4jax `vision_config`) gives `l4jax.vision.Llama4ForConditionalGeneration`,
    or with `text_only` the text model `Llama4ForCausalLM` (its vision tensors are not read).
    An l4jax checkpoint (`l4jax convert`) is restored with Orbax (`restore_params`); a
    quantized one (`l4jax convert --quantize`) with its quantized weights as stored.
    `quantize` (int4, int8, fp8: `l4jax.quantize`) quantizes the text model's weights, layer by
    layer while reading a Hugging Face or Meta checkpoint (docs/quantization.md). A Hugging
    Face FP8 checkpoint (compressed-tensors "float-quantized", as Maverick's FP8 release) loads
    as `quantize="fp8"`, its float8 experts copied as stored (`l4jax.convert.hf_fp8`).
    """
    if quantize is not None and quantize not in MODES:
        raise ConfigError(f"quantize={quantize!r}: choose one of {', '.join(MODES)}")
    fmt = detect_format(path)
    if fmt.name == "l4jax":
        config, params = restore_params(path, dtype=dtype, text_only=text_only, **runtime)
        if not hasattr(config, "vision"):
            stored = {q.mode for _, q in quantized_leaves(params)}
            if quantize is not None and not stored:
                params = quantize_params(params, config, quantize)
            elif quantize is not None and stored != {quantize}:
                raise ConfigError(
                    f"{path}: quantize={quantize!r}, but the checkpoint is quantized in "
                    f"{'/'.join(sorted(stored))} (it loads as stored without quantize=)"
                )
            return Llama4ForCausalLM(config), params
        _text_only_quantize(path, quantize)
        return Llama4ForConditionalGeneration(config), params
    multimodal = fmt.multimodal and not text_only
    if multimodal:
        _text_only_quantize(path, quantize)
    source = open_checkpoint(path, text_only=not multimodal)
    if getattr(source, "fp8", False):  # a compressed-tensors FP8 release: fp8 params as stored
        if quantize not in (None, "fp8"):
            raise ConfigError(
                f"{path}: an FP8 checkpoint loads as quantize='fp8', not {quantize!r} "
                "(its weights are float8 already)"
            )
        quantize = "fp8"
    name = str(jnp.dtype(dtype)) if dtype is not None else checkpoint_dtype(source.hf_config())
    config = source_config(source, multimodal, **{"dtype": name, "param_dtype": name, **runtime})
    if multimodal:
        log.info(
            "loading %s (%d text + %d vision layers) from %s",
            type(source).__name__,
            config.text.num_hidden_layers,
            config.vision.num_hidden_layers,
            path,
        )
        params = load_entries(source, multimodal_entries(config), config.text.param_dtype)
        return Llama4ForConditionalGeneration(config), params
    log.info(
        "loading %s (%d layers) from %s", type(source).__name__, config.num_hidden_layers, path
    )
    return Llama4ForCausalLM(config), read_params(source, config, quantize=quantize)


def _text_only_quantize(path: Any, quantize: str | None) -> None:
    if quantize is not None:
        raise ConfigError(
            f"{path}: quantize={quantize!r} quantizes the text model of a multimodal "
            "checkpoint: load it with text_only=True"
        )
