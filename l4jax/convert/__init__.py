"""Checkpoint conversion: Hugging Face and Meta formats to and from l4jax."""

from l4jax.convert.load import from_pretrained, load_params, open_checkpoint

__all__ = ["from_pretrained", "load_params", "open_checkpoint"]
