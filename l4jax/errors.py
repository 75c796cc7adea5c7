"""Exceptions l4jax raises for bad input. Each message names the field, file or tensor at fault."""


class ConfigError(ValueError):
    """An invalid or unsupported model configuration (names the field)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its config (names the file and tensor)."""


class InputError(ValueError):
    """Token ids, sequence lengths or data records a model cannot take (names the input)."""


class ImageError(ValueError):
    """An image that cannot be read or used, or images that do not fit the prompt (names the
    file or input at fault)."""


def read_json_object(
    path, error: type[ValueError] = ConfigError, missing: str = "config file not found"
) -> dict:
    """A JSON object from `path`; a missing, malformed or non-object file raises `error`
    (a missing one with the message `missing`), naming the file."""
    import json

    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: must be a JSON object, got {type(value).__name__}")
    return value
