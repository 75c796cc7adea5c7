"""Checkpoint conversion: Hugging Face and Meta formats to and from l4jax.

One-way stack: `mapping` (names and layouts) and `hostmem`, `streaming` (shared streaming
pieces) -> readers and writers (`hf`, `meta`, `orbax`, `export`) -> `formats` (detects a
directory's format once) -> `load` (`from_pretrained`) and `conversion` (`l4jax convert`).
"""

from l4jax.convert.conversion import convert_checkpoint
from l4jax.convert.export import export_hf
from l4jax.convert.formats import open_checkpoint
from l4jax.convert.load import from_pretrained, read_params
from l4jax.convert.orbax import restore_params

__all__ = [
    "convert_checkpoint",
    "export_hf",
    "from_pretrained",
    "open_checkpoint",
    "read_params",
    "restore_params",
]
