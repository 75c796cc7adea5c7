"""l4jax: Llama 4 (Scout, Maverick) in JAX/Flax, exact against the PyTorch references."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from l4jax.config import Llama4Config, RopeScaling, preset
from l4jax.model import Llama4ForCausalLM, init_params
from l4jax.quantization import quantize
from l4jax.vision import Llama4ForConditionalGeneration
from l4jax.vision_config import Llama4MultimodalConfig

if TYPE_CHECKING:
    from l4jax.convert import from_pretrained
    from l4jax.decoding import generate
    from l4jax.tokenizer import Tokenizer

# imported on first use, so that `import l4jax` does not load tensorstore, Orbax, safetensors
# or the tokenizer libraries (the loaders and the decoding CLI import them)
_LAZY = {
    "from_pretrained": "l4jax.convert",
    "generate": "l4jax.decoding",
    "Tokenizer": "l4jax.tokenizer",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'l4jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "Llama4Config",
    "Llama4ForCausalLM",
    "Llama4ForConditionalGeneration",
    "Llama4MultimodalConfig",
    "RopeScaling",
    "Tokenizer",
    "from_pretrained",
    "generate",
    "init_params",
    "preset",
    "quantize",
]
__version__ = "0.1.0"
