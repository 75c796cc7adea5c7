"""What a checkpoint directory holds, detected once: its format and whether it is multimodal.

    detect_format(path)  -> CheckpointFormat("hf" | "meta" | "l4jax", multimodal)
    open_checkpoint(path) -> the tensor source of its text model (HF names and layouts)
    open_streaming(path) -> (source, format, config) for streaming conversion

A multimodal checkpoint (a non-empty HF or l4jax `vision_config`, Meta `vision_args`) opens
with its vision tower under HF `Llama4ForConditionalGeneration` names unless `text_only`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from l4jax.config import Llama4Config
from l4jax.convert.hf import HFCheckpoint, HFMultimodalCheckpoint, StreamingHF, is_hf_dir
from l4jax.convert.hf_fp8 import FP8Source
from l4jax.convert.mapping import TensorSource
from l4jax.convert.orbax import L4jaxCheckpoint, is_l4jax_dir
from l4jax.errors import CheckpointError
from l4jax.vision_config import Llama4MultimodalConfig

META_PARAMS_FILE = "params.json"


@dataclasses.dataclass(frozen=True)
class CheckpointFormat:
    name: str  # "hf", "meta" or "l4jax"
    multimodal: bool


def detect_format(path: str | os.PathLike) -> CheckpointFormat:
    """The format of checkpoint directory `path`; CheckpointError if it is none of the three."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if is_l4jax_dir(p):
        name = "l4jax"
    elif is_hf_dir(p):
        name = "hf"
    elif (p / META_PARAMS_FILE).is_file():
        name = "meta"
    else:
        raise CheckpointError(
            f"{p}: unknown checkpoint format (expected config.json + *.safetensors from Hugging "
            "Face, or params.json + consolidated.NN.pth from Meta, or config.json + params/ "
            "from l4jax)"
        )
    return CheckpointFormat(name, _has_vision(p, name))


def _has_vision(p: Path, name: str) -> bool:
    """A non-empty `vision_config` (HF, l4jax) or `vision_args` (Meta); a missing or bad JSON
    file reads as text only (the text loader reports it)."""
    file, field = ("config.json", "vision_config")
    if name == "meta":
        file, field = META_PARAMS_FILE, "vision_args"
    try:
        with open(p / file) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and bool(config.get(field))


def open_checkpoint(path: str | os.PathLike, text_only: bool = True) -> TensorSource:
    """Open `path` as a tensor source: of its text model (`text_only`), or of the whole model
    of a multimodal checkpoint (an l4jax checkpoint is always the whole model)."""
    fmt = detect_format(path)
    vision = fmt.multimodal and not text_only
    if fmt.name == "l4jax":
        return L4jaxCheckpoint(path)
    if fmt.name == "hf":
        ckpt = HFMultimodalCheckpoint(path) if vision else HFCheckpoint(path)
        if not ckpt.fp8:
            return ckpt
        if vision:
            ckpt.close()
            raise CheckpointError(
                f"{path}: an FP8 (compressed-tensors) checkpoint loads its text model only: "
                "from_pretrained(path, text_only=True)"
            )
        return FP8Source(ckpt)
    from l4jax.convert.meta import MetaCheckpoint  # torch: only for Meta checkpoints

    return MetaCheckpoint(path, vision=vision)


def source_config(source: Any, multimodal: bool = False, **runtime: Any) -> Any:
    """The config of a tensor source's `hf_config()`: its `Llama4Config`, or with `multimodal`
    its `Llama4MultimodalConfig`; a CheckpointError naming the source's path."""
    build = Llama4MultimodalConfig if multimodal else Llama4Config
    try:
        return build.from_hf_dict(source.hf_config(), **runtime)
    except ValueError as e:
        raise CheckpointError(f"{getattr(source, 'path', '')}: {e}") from None


def open_streaming(path: str | os.PathLike) -> tuple[TensorSource, str, Any]:
    """Open `path` for streaming conversion: (source, format name, config), the whole model of
    a multimodal checkpoint under HF `Llama4ForConditionalGeneration` names with its
    `Llama4MultimodalConfig`, a text one with its `Llama4Config`."""
    fmt = detect_format(path)
    ckpt = open_checkpoint(path, text_only=False)
    try:
        if isinstance(ckpt, L4jaxCheckpoint):
            return ckpt, "l4jax", ckpt.config()
        if getattr(ckpt, "fp8", False):
            raise CheckpointError(
                f"{path}: an FP8 (compressed-tensors) checkpoint: `l4jax convert` does not read "
                "it; load it with from_pretrained(path, text_only=True)"
            )
        config = source_config(ckpt, fmt.multimodal)
    except BaseException:
        ckpt.close()
        raise
    if isinstance(ckpt, HFCheckpoint):
        return StreamingHF(ckpt), "hf", config
    from l4jax.convert.meta import StreamingMeta

    return StreamingMeta(ckpt), "meta", config
