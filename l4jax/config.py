"""Llama 4 text-model configuration: one frozen dataclass, presets, and Hugging Face config I/O.

Field names follow Hugging Face's `Llama4TextConfig`. Per-layer structure is stored explicitly
(`rope_layers`, `chunked_layers`, `moe_layers`) so the model never re-derives it, and so configs
that list layers out of pattern still load. l4jax runtime settings (compute/param dtype, MoE
and attention backends, remat policy, context-parallel layout) live in the same dataclass but
are not written to `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from l4jax.errors import ConfigError, read_json_object

# auto: pallas on TPU, else ragged_dot (l4jax.moe.resolve_impl); gather: decoding only
MOE_IMPLS = ("auto", "ragged_dot", "pallas", "megablox", "dense", "gather")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# l4jax.attention: auto = splash on TPU global layers, else blockwise for long, xla for short
ATTENTION_IMPLS = ("auto", "xla", "blockwise", "splash")
CONTEXT_PARALLEL_LAYOUTS = ("contiguous", "zigzag")  # global layers' token order on the ring
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """llama3-style RoPE frequency scaling, read from the checkpoint's config (never hard-coded)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """What one decoder layer does; layers with equal kinds share a scan slot."""

    use_rope: bool  # RoPE (+ qk-norm if enabled); False = NoPE layer (+ temperature tuning)
    chunked: bool  # chunked causal mask; False = global causal mask
    is_moe: bool  # MoE feed-forward; False = dense SwiGLU of intermediate_size_mlp


@dataclasses.dataclass(frozen=True)
class Llama4Config:
    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192  # each routed expert and the shared expert
    intermediate_size_mlp: int = 16384  # dense layers
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    rope_layers: tuple[bool, ...] = ()  # per layer: True = RoPE layer (HF no_rope_layers[i] == 1)
    chunked_layers: tuple[bool, ...] = ()  # per layer: chunked attention (HF layer_types)
    moe_layers: tuple[int, ...] = ()  # indices of MoE layers
    attention_chunk_size: int | None = 8192
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096 * 32
    initializer_range: float = 0.02
    bos_token_id: int | None = 200000
    eos_token_id: int | tuple[int, ...] | None = 200008
    pad_token_id: int | None = 200018
    # l4jax runtime settings (not part of the checkpoint)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    moe_impl: str = "auto"  # l4jax.moe.resolve_impl: pallas on TPU, ragged_dot elsewhere
    remat_policy: str = "none"
    attention_impl: str = "auto"  # l4jax.attention.resolve_impl
    context_parallel_layout: str = "contiguous"  # CONTEXT_PARALLEL_LAYOUTS

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def make(
        cls,
        *,
        num_hidden_layers: int,
        no_rope_layer_interval: int = 4,
        interleave_moe_layer_step: int = 1,
        **fields: Any,
    ) -> Llama4Config:
        """Build a config with the per-layer lists derived as Hugging Face derives them."""
        chunk = fields.get("attention_chunk_size", cls.attention_chunk_size)
        rope = default_rope_layers(num_hidden_layers, no_rope_layer_interval)
        fields.setdefault("rope_layers", rope)
        fields.setdefault("chunked_layers", tuple(r and chunk is not None for r in rope))
        fields.setdefault(
            "moe_layers", default_moe_layers(num_hidden_layers, interleave_moe_layer_step)
        )
        return cls(num_hidden_layers=num_hidden_layers, **fields)

    def __post_init__(self) -> None:
        _validate(self)

    def replace(self, **changes: Any) -> Llama4Config:
        return dataclasses.replace(self, **changes)

    # ---- derived structure ----------------------------------------------------------------
    @property
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        moe = set(self.moe_layers)
        return tuple(
            LayerKind(self.rope_layers[i], self.chunked_layers[i], i in moe)
            for i in range(self.num_hidden_layers)
        )

    @property
    def scan_period(self) -> int:
        """Smallest p dividing the depth such that layer i and layer i % p are of the same kind.

        The model scans `num_hidden_layers // p` times over a group of p layers (4 for Scout and
        Maverick), so compile time does not grow with depth.
        """
        kinds = self.layer_kinds
        n = len(kinds)
        for p in range(1, n + 1):
            if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
                return p
        return n

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse RoPE frequencies [head_dim // 2] in float32, llama3-scaled as configured."""
        return rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)

    def num_params(self, active: bool = False) -> int:
        """Parameter count (all, or active per token with top-k routing)."""
        d, v = self.hidden_size, self.vocab_size
        attn = d * self.head_dim * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        experts = self.num_experts_per_tok if active else self.num_local_experts
        moe = 3 * d * self.intermediate_size * (experts + 1) + d * self.num_local_experts
        dense = 3 * d * self.intermediate_size_mlp
        n_moe = len(self.moe_layers)
        layers = self.num_hidden_layers * (attn + 2 * d) + n_moe * moe
        layers += (self.num_hidden_layers - n_moe) * dense
        return layers + d + v * d * (1 if self.tie_word_embeddings else 2)

    # ---- Hugging Face config.json I/O -------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **runtime: Any) -> Llama4Config:
        """Read a HF `config.json` dict (`llama4_text`, or `llama4` with `text_config`)."""
        return _from_hf_dict(hf, runtime)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **runtime: Any) -> Llama4Config:
        return config_from_json_file(cls, path, **runtime)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `llama4_text` config.json dict transformers reads (both key styles for rope)."""
        return _to_hf_dict(self)

    def to_json_file(self, path: str | os.PathLike) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
        os.replace(tmp, path)


def default_rope_layers(num_layers: int, no_rope_layer_interval: int) -> tuple[bool, ...]:
    """HF default: layer i is NoPE iff (i + 1) % interval == 0."""
    return tuple((i + 1) % no_rope_layer_interval != 0 for i in range(num_layers))


def default_moe_layers(num_layers: int, interleave_moe_layer_step: int) -> tuple[int, ...]:
    """HF default: MoE at layers step-1, 2*step-1, ..."""
    step = interleave_moe_layer_step
    if step <= 0:
        return ()
    return tuple(range(step - 1, num_layers, step))


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """inv_freq_i = theta^(-2i/head_dim) in float32, then llama3 scaling (as HF computes it)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low, high, factor = scaling.low_freq_factor, scaling.high_freq_factor, scaling.factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / np.float32(factor), inv_freq)
    is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    if low != high:  # with low == high (Scout) the blend below would divide 0/0
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        scaled = np.where(is_medium, smoothed, scaled)
    return scaled.astype(np.float32)


# ---- presets: `Llama4Config.make` arguments, so overrides re-derive the per-layer lists ----

_SCOUT = dict(
    num_hidden_layers=48,
    num_local_experts=16,
    interleave_moe_layer_step=1,
    rope_scaling=RopeScaling(16.0, 1.0, 1.0, 8192),  # Instruct; the base model's config differs
    use_qk_norm=True,
    max_position_embeddings=10485760,
)
_MAVERICK = dict(
    num_hidden_layers=48,
    num_local_experts=128,
    interleave_moe_layer_step=2,
    rope_scaling=None,
    use_qk_norm=False,
    max_position_embeddings=1048576,
)
# small models: chunk and floor_scale small enough that short sequences cross them
_SMALL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    intermediate_size_mlp=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=8,
    num_experts_per_tok=1,
    interleave_moe_layer_step=2,
    attention_chunk_size=32,
    floor_scale=32,
    rope_theta=10000.0,
    rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64),
    max_position_embeddings=4096,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
# the benchmark configs of the MoE issue: moe16 (every layer MoE) and moe128 (every 2nd)
_BENCH = dict(
    _SMALL,
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1024,
    intermediate_size_mlp=2048,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    attention_chunk_size=256,
    floor_scale=256,
    rope_scaling=None,
)

PRESETS: dict[str, dict[str, Any]] = {
    "scout": _SCOUT,
    "maverick": _MAVERICK,
    # tiny: unit tests and smoke runs; every layer kind appears (RoPE/NoPE x MoE/dense)
    "tiny": _SMALL,
    # demo: the Quickstart model, trains on a 2-core CPU in minutes
    "demo": dict(
        _SMALL,
        hidden_size=256,
        intermediate_size=256,
        intermediate_size_mlp=512,
        num_attention_heads=8,
        head_dim=32,
        attention_chunk_size=64,
        floor_scale=64,
    ),
    "moe16": dict(_BENCH, num_local_experts=16, interleave_moe_layer_step=1),
    "moe128": dict(_BENCH, num_local_experts=128, interleave_moe_layer_step=2),
}


def preset(name: str, **overrides: Any) -> Llama4Config:
    """A named config (`scout`, `maverick`, `tiny`, `demo`, `moe16`, `moe128`) with overrides.

    Overrides may include `no_rope_layer_interval` / `interleave_moe_layer_step`; per-layer lists
    are re-derived for the overridden depth unless given explicitly.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return Llama4Config.make(**{**PRESETS[name], **overrides})


# ---- validation ---------------------------------------------------------------------------


def config_from_json_file(cls: Any, path: str | os.PathLike, **runtime: Any) -> Any:
    """`cls.from_hf_dict` of the JSON object in `path`; a ConfigError names the file."""
    hf = read_json_object(path)
    try:
        return cls.from_hf_dict(hf, **runtime)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def require(ok: bool, field: str, message: str, owner: str = "Llama4Config") -> None:
    """Raise ConfigError naming `owner.field` unless `ok` (config validation)."""
    if not ok:
        raise ConfigError(f"{owner}.{field}: {message}")


def require_choices(c: Any, owner: str, choices: dict[str, tuple[str, ...]]) -> None:
    """Each field of `c` named in `choices` is one of its choices (config validation)."""
    for field, allowed in choices.items():
        value = getattr(c, field)
        require(value in allowed, field, f"{value!r} is not one of {allowed}", owner)


# the runtime settings that text and vision configs share, and their choices
RUNTIME_CHOICES = {"dtype": DTYPES, "param_dtype": DTYPES, "remat_policy": REMAT_POLICIES}


def _validate(c: Llama4Config) -> None:
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "num_local_experts",
        "num_experts_per_tok",
    ):
        value = getattr(c, name)
        require(
            isinstance(value, int) and value > 0, name, f"must be a positive int, got {value!r}"
        )
    require(
        c.num_attention_heads % c.num_key_value_heads == 0,
        "num_key_value_heads",
        f"{c.num_key_value_heads} does not divide num_attention_heads={c.num_attention_heads}",
    )
    require(c.head_dim % 2 == 0, "head_dim", f"must be even for RoPE, got {c.head_dim}")
    require(
        c.num_experts_per_tok <= c.num_local_experts,
        "num_experts_per_tok",
        f"{c.num_experts_per_tok} exceeds num_local_experts={c.num_local_experts}",
    )
    n = c.num_hidden_layers
    for name in ("rope_layers", "chunked_layers"):
        value = getattr(c, name)
        require(len(value) == n, name, f"has {len(value)} entries for {n} layers")
    require(
        all(isinstance(i, int) and 0 <= i < n for i in c.moe_layers),
        "moe_layers",
        f"indices must lie in [0, {n}), got {list(c.moe_layers)}",
    )
    require(len(set(c.moe_layers)) == len(c.moe_layers), "moe_layers", "has duplicates")
    if len(c.moe_layers) < n:
        require(
            c.intermediate_size_mlp > 0,
            "intermediate_size_mlp",
            "dense layers exist, so it must be positive",
        )
    if any(c.chunked_layers):
        require(
            c.attention_chunk_size is not None and c.attention_chunk_size > 0,
            "attention_chunk_size",
            f"chunked layers need a positive chunk size, got {c.attention_chunk_size!r}",
        )
    require(c.rope_theta > 0, "rope_theta", f"must be positive, got {c.rope_theta}")
    require(c.floor_scale > 0, "floor_scale", f"must be positive, got {c.floor_scale}")
    require(c.rms_norm_eps > 0, "rms_norm_eps", f"must be positive, got {c.rms_norm_eps}")
    if c.rope_scaling is not None:
        s = c.rope_scaling
        require(s.factor > 0, "rope_scaling.factor", f"must be positive, got {s.factor}")
        require(
            0 < s.low_freq_factor <= s.high_freq_factor,
            "rope_scaling",
            f"need 0 < low_freq_factor <= high_freq_factor, got {s}",
        )
    require_choices(
        c,
        "Llama4Config",
        {
            **RUNTIME_CHOICES,
            "moe_impl": MOE_IMPLS,
            "attention_impl": ATTENTION_IMPLS,
            "context_parallel_layout": CONTEXT_PARALLEL_LAYOUTS,
        },
    )


# ---- HF dict conversion ---------------------------------------------------------------------

_HF_SCALARS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "intermediate_size_mlp",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_local_experts",
    "num_experts_per_tok",
    "attention_chunk_size",
    "use_qk_norm",
    "attn_temperature_tuning",
    "floor_scale",
    "attn_scale",
    "rms_norm_eps",
    "tie_word_embeddings",
    "max_position_embeddings",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
_HF_DEFAULTS = Llama4Config.__dataclass_fields__


def _from_hf_dict(hf: dict[str, Any], runtime: dict[str, Any]) -> Llama4Config:
    if not isinstance(hf, dict):
        raise ConfigError(f"config must be a JSON object, got {type(hf).__name__}")
    if "text_config" in hf:  # multimodal `llama4` config
        hf = hf["text_config"]
        if not isinstance(hf, dict):
            raise ConfigError("text_config: must be a JSON object")
    model_type = hf.get("model_type", "llama4_text")
    if model_type not in ("llama4_text", "llama4"):
        raise ConfigError(f"model_type: expected 'llama4_text', got {model_type!r}")
    fields: dict[str, Any] = {}
    for name in _HF_SCALARS:
        if name in hf:
            fields[name] = hf[name]
    for name in ("use_qk_norm", "attn_temperature_tuning", "tie_word_embeddings"):
        if name in fields:  # hub configs carry e.g. "attn_temperature_tuning": 4
            fields[name] = bool(fields[name])
    if isinstance(fields.get("eos_token_id"), list):
        fields["eos_token_id"] = tuple(fields["eos_token_id"])
    if "head_dim" not in fields or fields["head_dim"] is None:
        try:
            fields["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
        except (KeyError, TypeError):
            raise ConfigError("head_dim: missing and cannot be derived") from None
    if fields.get("num_key_value_heads") is None and "num_attention_heads" in hf:
        fields["num_key_value_heads"] = hf["num_attention_heads"]
    if "hidden_act" in hf and hf["hidden_act"] != "silu":
        raise ConfigError(f"hidden_act: only 'silu' is supported, got {hf['hidden_act']!r}")
    if hf.get("attention_bias"):
        raise ConfigError("attention_bias: Llama 4 has no attention biases; got true")
    theta, scaling = _rope_from_hf(hf)
    fields["rope_theta"] = theta
    fields["rope_scaling"] = scaling
    n = fields.get("num_hidden_layers", _HF_DEFAULTS["num_hidden_layers"].default)
    fields.update(_layer_lists_from_hf(hf, n, fields.get("attention_chunk_size", 8192)))
    fields.update(runtime)
    try:
        return Llama4Config(**fields)
    except TypeError as e:
        raise ConfigError(str(e)) from None


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """`rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (hub configs)."""
    params = hf.get("rope_parameters")
    field = "rope_parameters"
    if not params:
        params = dict(hf.get("rope_scaling") or {})
        field = "rope_scaling"
        if "rope_theta" in hf:
            params["rope_theta"] = hf["rope_theta"]
    if not isinstance(params, dict):
        raise ConfigError(f"{field}: must be an object, got {params!r}")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 500000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(f"{field}.rope_type: only 'llama3' or 'default', got {rope_type!r}")
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(
                params.get(
                    "original_max_position_embeddings", hf.get("max_position_embeddings", 8192)
                )
            ),
        )
    except KeyError as e:
        raise ConfigError(f"{field}: llama3 scaling needs {e.args[0]!r}") from None
    return theta, scaling


def _layer_lists_from_hf(hf: dict[str, Any], n: int, chunk: int | None) -> dict[str, Any]:
    interval = hf.get("no_rope_layer_interval", 4)
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        bad = [t for t in layer_types if t not in ("chunked_attention", "full_attention")]
        if bad or len(layer_types) != n:
            raise ConfigError(
                f"layer_types: need {n} entries of 'chunked_attention'/'full_attention', "
                f"got {layer_types!r}"
            )
    no_rope = hf.get("no_rope_layers")
    if no_rope:  # HF: no_rope_layers[i] == 1 means layer i USES RoPE
        if len(no_rope) != n or any(v not in (0, 1, True, False) for v in no_rope):
            raise ConfigError(f"no_rope_layers: need {n} entries of 0/1, got {no_rope!r}")
        rope = tuple(bool(v) for v in no_rope)
    elif layer_types is not None:
        rope = tuple(t == "chunked_attention" for t in layer_types)
    else:
        rope = default_rope_layers(n, interval)
    if layer_types is not None:
        chunked = tuple(t == "chunked_attention" for t in layer_types)
    else:
        chunked = tuple(r and chunk is not None for r in rope)
    moe = hf.get("moe_layers")
    if moe is None:
        moe = default_moe_layers(n, hf.get("interleave_moe_layer_step", 1))
    return {"rope_layers": rope, "chunked_layers": chunked, "moe_layers": tuple(moe)}


def _to_hf_dict(c: Llama4Config) -> dict[str, Any]:
    out: dict[str, Any] = {name: getattr(c, name) for name in _HF_SCALARS}
    if isinstance(out["eos_token_id"], tuple):
        out["eos_token_id"] = list(out["eos_token_id"])
    out.update(
        model_type="llama4_text",
        architectures=["Llama4ForCausalLM"],
        hidden_act="silu",
        attention_bias=False,
        no_rope_layers=[int(r) for r in c.rope_layers],
        layer_types=["chunked_attention" if ch else "full_attention" for ch in c.chunked_layers],
        moe_layers=list(c.moe_layers),
        interleave_moe_layer_step=_moe_step(c),
        rope_theta=c.rope_theta,
        torch_dtype=c.param_dtype,
    )
    if c.rope_scaling is None:
        out["rope_scaling"] = None
    else:
        out["rope_scaling"] = dict(rope_type="llama3", **dataclasses.asdict(c.rope_scaling))
    return out


def _moe_step(c: Llama4Config) -> int:
    """The interleave step that reproduces `moe_layers`, or 1 when none does (list wins)."""
    for step in range(1, c.num_hidden_layers + 1):
        if default_moe_layers(c.num_hidden_layers, step) == tuple(c.moe_layers):
            return step
    return 1
