"""Checkpoint conversion: Hugging Face and Meta formats to and from l4jax."""

from l4jax.convert.convert import convert_checkpoint
from l4jax.convert.export import export_hf
from l4jax.convert.load import from_pretrained, load_params, open_checkpoint
from l4jax.convert.orbax import restore_params

__all__ = [
    "convert_checkpoint",
    "export_hf",
    "from_pretrained",
    "load_params",
    "open_checkpoint",
    "restore_params",
]
