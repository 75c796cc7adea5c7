"""l4jax: Llama 4 (Scout, Maverick) in JAX/Flax, exact against the PyTorch references."""

from l4jax.config import Llama4Config, RopeScaling, preset
from l4jax.convert import from_pretrained
from l4jax.model import Llama4ForCausalLM, init_params

__all__ = [
    "Llama4Config",
    "Llama4ForCausalLM",
    "RopeScaling",
    "from_pretrained",
    "init_params",
    "preset",
]
__version__ = "0.1.0"
