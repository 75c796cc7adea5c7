"""Exceptions l4jax raises for bad input. Each message names the field, file or tensor at fault."""


class ConfigError(ValueError):
    """An invalid or unsupported model configuration (names the field)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its config (names the file and tensor)."""


class ImageError(ValueError):
    """An image that cannot be read or used, or images that do not fit the prompt (names the
    file or input at fault)."""
