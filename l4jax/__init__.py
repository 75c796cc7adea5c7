"""l4jax: Llama 4 (Scout, Maverick) in JAX/Flax, exact against the PyTorch references."""

from l4jax.config import Llama4Config, RopeScaling, preset
from l4jax.convert import from_pretrained
from l4jax.generate import generate  # `l4jax.generate` is now this function
from l4jax.model import Llama4ForCausalLM, init_params
from l4jax.quantization import quantize
from l4jax.tokenizer import Tokenizer
from l4jax.vision import Llama4ForConditionalGeneration, Llama4MultimodalConfig

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
