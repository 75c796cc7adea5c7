"""Multimodal checkpoints: `(Llama4ForConditionalGeneration, params)` from HF or Meta files.

A multimodal tensor source presents every tensor under the name HF's
`Llama4ForConditionalGeneration` checkpoint uses (`language_model.model...`, `vision_model...`,
`multi_modal_projector...`); `mapping.multimodal_entries` maps them onto the param tree
`{"language_model": ..., "vision_model": ..., "multi_modal_projector": ...}`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from l4jax.config import Llama4Config
from l4jax.convert.hf import HFCheckpoint, is_hf_dir
from l4jax.convert.mapping import TensorSource, multimodal_entries
from l4jax.errors import CheckpointError, ConfigError
from l4jax.vision import VISION_RUNTIME, Llama4ForConditionalGeneration, Llama4MultimodalConfig

log = logging.getLogger(__name__)


class HFMultimodalCheckpoint(HFCheckpoint):
    """A HF multimodal checkpoint read under its stored names, vision tensors included."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._where = {key: (file, key) for file, keys in self._files.items() for key in keys}
        self._unused = []


def is_multimodal(path: str | os.PathLike) -> bool:
    """A HF or l4jax checkpoint with a non-empty `vision_config`, or a Meta one with
    `vision_args`."""
    from l4jax.convert.orbax import is_l4jax_dir  # (orbax imports this module)

    p = Path(path)
    for name, field in (("config.json", "vision_config"), ("params.json", "vision_args")):
        try:
            with open(p / name) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue  # missing or bad: the text loader reports it
        if isinstance(config, dict) and config.get(field):
            return name == "params.json" or is_hf_dir(p) or is_l4jax_dir(p)
    return False


def model_config(hf: dict[str, Any], **runtime: Any) -> Llama4Config | Llama4MultimodalConfig:
    """The config of a `config.json` dict: multimodal when it has a non-empty `vision_config`.
    Raises ConfigError."""
    if hf.get("vision_config"):
        return Llama4MultimodalConfig.from_hf_dict(hf, **runtime)
    return Llama4Config.from_hf_dict(hf, **runtime)


def with_runtime(config: Any, **runtime: Any) -> Any:
    """`config.replace(**runtime)` for a text or multimodal config (whose vision tower takes
    dtype, param_dtype and remat_policy)."""
    if not isinstance(config, Llama4MultimodalConfig):
        return config.replace(**runtime)
    vision = {k: v for k, v in runtime.items() if k in VISION_RUNTIME}
    return config.replace(
        text=config.text.replace(**runtime), vision=config.vision.replace(**vision)
    )


def open_multimodal(path: str | os.PathLike) -> TensorSource:
    from l4jax.convert.orbax import L4jaxCheckpoint, is_l4jax_dir

    p = Path(path)
    if is_l4jax_dir(p):
        return L4jaxCheckpoint(p)
    if is_hf_dir(p):
        return HFMultimodalCheckpoint(p)
    if (p / "params.json").is_file():
        from l4jax.convert.meta import MetaCheckpoint

        return MetaCheckpoint(p, vision=True)
    raise CheckpointError(f"{p}: not a Hugging Face, Meta or l4jax multimodal checkpoint")


def multimodal_config(source: Any, **runtime: Any) -> Llama4MultimodalConfig:
    try:
        return Llama4MultimodalConfig.from_hf_dict(source.hf_config(), **runtime)
    except ConfigError as e:
        raise CheckpointError(f"{getattr(source, 'path', '')}: {e}") from None


def load_multimodal(
    path: str | os.PathLike, dtype: Any = None, **runtime: Any
) -> tuple[Llama4ForConditionalGeneration, dict[str, Any]]:
    """`(model, params)` of a multimodal checkpoint; `dtype` and `runtime` as `from_pretrained`
    (dtype/param_dtype/remat_policy apply to both towers)."""
    from l4jax.convert.load import _torch_dtype, load_entries

    source = open_multimodal(path)
    hf = source.hf_config()
    name = str(jnp.dtype(dtype)) if dtype is not None else _torch_dtype(hf.get("text_config", hf))
    config = multimodal_config(source, **{"dtype": name, "param_dtype": name, **runtime})
    log.info(
        "loading %s (%d text + %d vision layers) from %s",
        type(source).__name__,
        config.text.num_hidden_layers,
        config.vision.num_hidden_layers,
        path,
    )
    params = load_entries(source, multimodal_entries(config), config.text.param_dtype)
    return Llama4ForConditionalGeneration(config), params
