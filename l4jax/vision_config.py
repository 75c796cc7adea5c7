"""Vision and multimodal configs (HF `Llama4VisionConfig`, the `llama4` config.json), and the
config building that loaders share: text or multimodal config of a `config.json` dict, runtime
settings applied to either, the stored dtype of a checkpoint.

This is the config layer (beside `l4jax.config`): it imports no model code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from l4jax.config import (
    RUNTIME_CHOICES,
    Llama4Config,
    config_from_json_file,
    require,
    require_choices,
)
from l4jax.errors import ConfigError

# Both references use torch LayerNorm's default eps (HF ignores `norm_eps`, Meta never reads it).
LAYER_NORM_EPS = 1e-5
VISION_RUNTIME = ("dtype", "param_dtype", "remat_policy")
# image normalisation precisions (`l4jax.preprocess`); here so the CLI parser needs no Pillow
PIXEL_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Llama4VisionConfig:
    """HF `Llama4VisionConfig` fields (defaults: Scout/Maverick) plus l4jax runtime settings."""

    hidden_size: int = 1408
    intermediate_size: int = 5632  # encoder MLP hidden AND the adapter's input (Dv / r^2)
    num_hidden_layers: int = 34
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 336  # tile side
    patch_size: int = 14
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096  # adapter fc1 output
    projector_output_dim: int = 4096  # adapter fc2 output
    vision_output_dim: int = 4096  # projector input
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    # l4jax runtime settings (not part of the checkpoint)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"

    def __post_init__(self) -> None:
        _validate_vision(self)

    def replace(self, **changes: Any) -> Llama4VisionConfig:
        return dataclasses.replace(self, **changes)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Patches per tile side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches per tile, without the CLS token."""
        return self.grid_size**2

    @property
    def shuffle_factor(self) -> int:
        """Patches merged into one token by pixel shuffle: round(1 / r^2) (4 for r = 0.5)."""
        return int(round(1.0 / self.pixel_shuffle_ratio**2))

    @property
    def tokens_per_tile(self) -> int:
        """`<|patch|>` tokens per tile (144 for 336px tiles, patch 14, r = 0.5)."""
        return self.num_patches // self.shuffle_factor

    @property
    def shuffled_dim(self) -> int:
        return self.hidden_size * self.shuffle_factor

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **runtime: Any) -> Llama4VisionConfig:
        """Read a HF `vision_config` dict (hub style `rope_theta` or transformers 5 style)."""
        return _vision_from_hf(hf, runtime)

    def to_hf_dict(self) -> dict[str, Any]:
        out = {f: getattr(self, f) for f in _HF_VISION_FIELDS}
        out.update(
            model_type="llama4_vision_model",
            hidden_act="gelu",
            norm_eps=LAYER_NORM_EPS,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            vision_feature_select_strategy="default",
            multi_modal_projector_bias=False,
        )
        return out


_HF_VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "pixel_shuffle_ratio",
    "projector_input_dim",
    "projector_output_dim",
    "vision_output_dim",
    "initializer_range",
)


def _validate_vision(c: Llama4VisionConfig) -> None:
    def check(ok: bool, field: str, message: str) -> None:
        require(ok, field, message, owner="Llama4VisionConfig")

    for name in _HF_VISION_FIELDS[:11]:
        if name == "pixel_shuffle_ratio":
            continue
        value = getattr(c, name)
        check(isinstance(value, int) and value > 0, name, f"must be a positive int, got {value!r}")
    r = c.pixel_shuffle_ratio
    check(0 < r <= 1, "pixel_shuffle_ratio", f"must lie in (0, 1], got {r!r}")
    check(
        c.hidden_size % c.num_attention_heads == 0,
        "num_attention_heads",
        f"{c.num_attention_heads} does not divide hidden_size={c.hidden_size}",
    )
    check(
        c.head_dim % 4 == 0,
        "num_attention_heads",
        f"head_dim {c.head_dim} must be divisible by 4 (2D RoPE: half the pairs per axis)",
    )
    check(
        c.image_size % c.patch_size == 0,
        "patch_size",
        f"{c.patch_size} does not divide image_size={c.image_size}",
    )
    g = c.grid_size
    check(
        float(g * r).is_integer() and float(c.hidden_size / r).is_integer(),
        "pixel_shuffle_ratio",
        f"{r} must map the {g}x{g} patch grid and hidden_size {c.hidden_size} to integers",
    )
    check(
        c.num_patches % c.shuffle_factor == 0 and abs(r * r * c.shuffle_factor - 1) < 1e-9,
        "pixel_shuffle_ratio",
        f"{r}: 1/r^2 must be an integer dividing the {c.num_patches} patches",
    )
    check(
        c.intermediate_size == c.shuffled_dim,
        "intermediate_size",
        f"{c.intermediate_size} must equal hidden_size / pixel_shuffle_ratio^2 = "
        f"{c.shuffled_dim}: HF's vision adapter takes intermediate_size inputs",
    )
    check(
        c.projector_input_dim == c.projector_output_dim,
        "projector_output_dim",
        f"{c.projector_output_dim} must equal projector_input_dim={c.projector_input_dim} "
        "(the adapter's fc2 maps fc1's output)",
    )
    check(
        c.vision_output_dim == c.projector_output_dim,
        "vision_output_dim",
        f"{c.vision_output_dim} must equal projector_output_dim={c.projector_output_dim}",
    )
    check(c.rope_theta > 0, "rope_theta", f"must be positive, got {c.rope_theta}")
    require_choices(c, "Llama4VisionConfig", RUNTIME_CHOICES)


def _square(hf: dict[str, Any], name: str) -> None:
    value = hf.get(name)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"vision_config.{name}: only square sizes are supported, got {value}")
        hf[name] = value[0]


def _vision_from_hf(hf: dict[str, Any], runtime: dict[str, Any]) -> Llama4VisionConfig:
    if not isinstance(hf, dict):
        raise ConfigError(f"vision_config: must be a JSON object, got {type(hf).__name__}")
    hf = dict(hf)
    model_type = hf.get("model_type", "llama4_vision_model")
    if model_type != "llama4_vision_model":
        raise ConfigError(
            f"vision_config.model_type: expected 'llama4_vision_model', got {model_type!r}"
        )
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(
            f"vision_config.hidden_act: only 'gelu' is supported, got {hf['hidden_act']!r}"
        )
    if hf.get("norm_eps", LAYER_NORM_EPS) != LAYER_NORM_EPS:
        raise ConfigError(
            f"vision_config.norm_eps: {hf['norm_eps']} unsupported: both references use "
            f"LayerNorm eps {LAYER_NORM_EPS} whatever the config says"
        )
    for name in ("image_size", "patch_size"):
        _square(hf, name)
    fields = {name: hf[name] for name in _HF_VISION_FIELDS if name in hf}
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
        raise ConfigError(f"vision_config.rope_parameters: only default RoPE, got {rope!r}")
    fields["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    fields.update({k: v for k, v in runtime.items() if k in VISION_RUNTIME})
    try:
        return Llama4VisionConfig(**fields)
    except ConfigError as e:
        raise ConfigError(f"vision_config: {e}") from None


@dataclasses.dataclass(frozen=True)
class Llama4MultimodalConfig:
    """The `llama4` config.json: text and vision configs plus the image token ids."""

    text: Llama4Config
    vision: Llama4VisionConfig
    image_token_index: int = 200092  # <|patch|>: its embeddings are replaced by image features
    boi_token_index: int = 200080  # <|image_start|>
    eoi_token_index: int = 200081  # <|image_end|>

    def replace(self, **changes: Any) -> Llama4MultimodalConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **runtime: Any) -> Llama4MultimodalConfig:
        """Read a HF `llama4` config.json dict; `runtime` sets dtype etc. of both towers."""
        if not isinstance(hf, dict) or not isinstance(hf.get("vision_config"), dict):
            raise ConfigError("vision_config: missing (not a multimodal `llama4` config)")
        text = Llama4Config.from_hf_dict(hf, **runtime)
        vision = Llama4VisionConfig.from_hf_dict(hf["vision_config"], **runtime)
        ids = {
            k: hf[k] for k in ("image_token_index", "boi_token_index", "eoi_token_index") if k in hf
        }
        return cls(text, vision, **ids)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **runtime: Any) -> Llama4MultimodalConfig:
        return config_from_json_file(cls, path, **runtime)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `llama4` config.json dict `transformers.Llama4Config` reads."""
        text = self.text.to_hf_dict()
        text.pop("architectures", None)
        return {
            "model_type": "llama4",
            "architectures": ["Llama4ForConditionalGeneration"],
            "text_config": text,
            "vision_config": self.vision.to_hf_dict(),
            "image_token_index": self.image_token_index,
            "boi_token_index": self.boi_token_index,
            "eoi_token_index": self.eoi_token_index,
            "tie_word_embeddings": False,
            "torch_dtype": self.text.param_dtype,
        }

    def to_json_file(self, path: str | os.PathLike) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
        os.replace(tmp, path)


VISION_PRESETS: dict[str, dict[str, Any]] = {
    "scout": {},  # Scout and Maverick share the vision tower
    "maverick": {},
    # tiny: 56px tiles of 4x4 patches -> 4 tokens per tile; unit tests and smoke runs
    "tiny": dict(
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        projector_input_dim=48,
        projector_output_dim=48,
        vision_output_dim=48,
    ),
}


def vision_preset(name: str, **overrides: Any) -> Llama4VisionConfig:
    if name not in VISION_PRESETS:
        raise ConfigError(f"unknown vision preset {name!r}; choose one of {sorted(VISION_PRESETS)}")
    return Llama4VisionConfig(**{**VISION_PRESETS[name], **overrides})


def model_config(hf: dict[str, Any], **runtime: Any) -> Llama4Config | Llama4MultimodalConfig:
    """The config of a `config.json` dict: multimodal when it has a non-empty `vision_config`.
    Raises ConfigError."""
    if hf.get("vision_config"):
        return Llama4MultimodalConfig.from_hf_dict(hf, **runtime)
    return Llama4Config.from_hf_dict(hf, **runtime)


def with_runtime(config: Any, **runtime: Any) -> Any:
    """`config.replace(**runtime)` for a text or multimodal config (whose vision tower takes
    dtype, param_dtype and remat_policy)."""
    if not isinstance(config, Llama4MultimodalConfig):
        return config.replace(**runtime)
    vision = {k: v for k, v in runtime.items() if k in VISION_RUNTIME}
    return config.replace(
        text=config.text.replace(**runtime), vision=config.vision.replace(**vision)
    )


def checkpoint_dtype(hf: dict[str, Any]) -> str:
    """The stored param dtype a `config.json` dict names (`torch_dtype`/`dtype` of its text
    config), float32 when it names none or another."""
    text = hf.get("text_config", hf)
    name = text.get("torch_dtype") or text.get("dtype") or "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"
