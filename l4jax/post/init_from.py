"""The checkpoint that `--init-from` names (an l4jax training run, an l4jax, HF or Meta
checkpoint): its model config, and its params placed on the mesh. Read by the sft/dpo/grpo
tasks, `l4jax train` (the model to train) and `l4jax merge-lora` (a LoRA run's base)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from l4jax.config import Llama4Config
from l4jax.errors import ConfigError
from l4jax.quantization import quantize as quantize_params


def load_init(path: str, config: Llama4Config, shardings: Any, quantize: str | None = None) -> Any:
    """Params of `--init-from` (an l4jax training run, an l4jax, HF or Meta checkpoint) placed
    on `shardings`; the checkpoint must hold the model being trained. `quantize`: QLoRA's base,
    quantized while streaming from a checkpoint (a training run's params: after restoring)."""
    # imported on use: they load Orbax and tensorstore
    from l4jax.checkpoint import is_training_run, restore_run
    from l4jax.convert import from_pretrained
    from l4jax.convert.quantized import place_param

    p = Path(path)
    runtime = {"dtype": config.dtype, "param_dtype": config.param_dtype}
    if is_training_run(p):
        loaded, params = restore_run(p, shardings=shardings, **runtime)
        if quantize:
            params = quantize_params(params, loaded, quantize)
    else:
        model, params = from_pretrained(p, text_only=True, quantize=quantize, **runtime)
        loaded = model.config
        params = jax.tree.map(lambda s, w: place_param(w, s), shardings, params,
                              is_leaf=is_sharding)  # fmt: skip
    if loaded.replace(moe_impl=config.moe_impl, remat_policy=config.remat_policy) != config:
        raise ConfigError(f"--init-from {path}: holds another model than the one configured")
    return params


def is_sharding(x: Any) -> bool:
    return isinstance(x, jax.sharding.Sharding)


def init_from_config(path: str, **runtime: Any) -> Llama4Config:
    """The model config of an `--init-from` checkpoint or training run."""
    from l4jax.checkpoint import is_training_run, read_run_config
    from l4jax.convert.formats import open_checkpoint, source_config

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--init-from {path}: no such directory")
    if is_training_run(p):
        return read_run_config(p, **runtime)
    return source_config(open_checkpoint(p), **runtime)
