"""Llama 4 early-fusion vision: encoder, pixel shuffle, adapter, projector, multimodal model.

    tiles [N, 3, S, S] -> patches [N, L, C*P*P] (unfold order c, ky, kx) -> linear, no bias
      -> append CLS (last) -> + positional_embedding_vlm [L+1, Dv] -> LayerNorm pre
      -> scanned pre-LN blocks (biases, non-causal, 2D RoPE; CLS not rotated) -> LayerNorm post
      -> drop CLS -> pixel shuffle r (L -> L*r^2 tokens of Dv/r^2) -> GELU(fc2(GELU(fc1(x))))
      -> projector (no bias) -> text hidden size, replacing the `<|patch|>` token embeddings
         in order (tiles row-major, the global tile last).

Parameters are named like Hugging Face's `Llama4ForConditionalGeneration` (`vision_model`,
`multi_modal_projector`, `language_model`) and carry logical axis names; `sharding/rules.py`
maps the vision-only ones (`vision_embed`, `vision_heads`, `vision_mlp`, `vision_adapter`, ...)
like the text model's (docs/vision.md, "Sharding"). Shapes in names: N tiles, L patches per
tile (+1 CLS), Dv vision hidden, K heads, H head_dim, F MLP hidden, B batch, T tokens, D text
hidden.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from l4jax.attention import dot_product_attention
from l4jax.model import (
    REMAT_POLICY_FNS,
    Llama4ForCausalLM,
    apply_rope,
    fan_in_init,
    param,
)
from l4jax.vision_config import LAYER_NORM_EPS, Llama4MultimodalConfig, Llama4VisionConfig

Array = jax.Array
ACT_NLD = ("activation_vision_tiles", "activation_vision_length", "activation_vision_embed")


# ---- numerics ---------------------------------------------------------------------------------


def layer_norm(x: Array, scale: Array, bias: Array, eps: float = LAYER_NORM_EPS) -> Array:
    """(x - mean) * rsqrt(var + eps) * scale + bias, computed in fp32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def vision_rope_angles(config: Llama4VisionConfig) -> np.ndarray:
    """[L + 1, H/2] fp32 angles: pair k < H/4 turns by (x+1) f_k, pair H/4 + k by (y+1) f_k,
    f_k = theta^(-4k/H), for patch (x, y) of the row-major grid; the CLS row (last) is 0."""
    g, half = config.grid_size, config.head_dim // 2
    exponent = np.arange(0, half, 2)[: half // 2].astype(np.float32) / np.float32(half)
    freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    idx = np.arange(g * g)
    x = (idx % g + 1).astype(np.float32)[:, None] * freq
    y = (idx // g + 1).astype(np.float32)[:, None] * freq
    angles = np.concatenate([x, y], axis=-1)
    return np.concatenate([angles, np.zeros((1, half), np.float32)]).astype(np.float32)


def patchify(pixels_nchw: Array, patch: int) -> Array:
    """[N, C, S, S] -> [N, L, C*P*P]: torch Unfold's order (patches row-major, (c, ky, kx))."""
    n, c, s, _ = pixels_nchw.shape
    g = s // patch
    x = pixels_nchw.reshape(n, c, g, patch, g, patch)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * patch * patch)


def pixel_shuffle(x_nlc: Array, ratio: float) -> Array:
    """[N, L, C] -> [N, L r^2, C / r^2], exactly HF's and Meta's `pixel_shuffle`."""
    n, length, c = x_nlc.shape
    side = int(math.isqrt(length))
    x = x_nlc.reshape(n, side, side, c)
    x = x.reshape(n, side, int(side * ratio), int(c / ratio)).transpose(0, 2, 1, 3)
    x = x.reshape(n, int(side * ratio), int(side * ratio), int(c / ratio**2))
    return x.transpose(0, 2, 1, 3).reshape(n, -1, int(c / ratio**2))


def replace_image_embeddings(
    x_btd: Array, tokens_bt: Array, image_embeds_md: Array, image_token_id: int
) -> Array:
    """Row-major over (b, t), the i-th `image_token_id` position takes image_embeds_md[i]
    (HF's `masked_scatter`; Meta's per-sample scatter gives the same order)."""
    mask_bt = tokens_bt == image_token_id
    index_bt = jnp.cumsum(mask_bt.reshape(-1)).reshape(mask_bt.shape) - 1
    index_bt = jnp.clip(index_bt, 0, image_embeds_md.shape[0] - 1)
    gathered = jnp.take(image_embeds_md.astype(x_btd.dtype), index_bt, axis=0)
    return jnp.where(mask_bt[..., None], gathered, x_btd)


def check_image_inputs(
    config: Llama4MultimodalConfig, tokens_bt: Any, pixel_values: Any | None
) -> None:
    """Shape of `pixel_values` [N, C, S, S]; with concrete tokens, one `<|patch|>` per feature.

    Raises ValueError naming what is wrong. The shape check also runs under `jax.jit`; the
    count check needs concrete tokens, so call this before jitting a forward pass.
    """
    v = config.vision
    if pixel_values is None:
        return
    expected = (v.num_channels, v.image_size, v.image_size)
    shape = tuple(pixel_values.shape)
    if len(shape) != 4 or shape[1:] != expected:
        hint = ""
        if len(shape) == 4 and shape[1] != v.num_channels:
            hint = f" ({shape[1]} channels, the model takes {v.num_channels})"
        raise ValueError(
            f"pixel_values: expected tiles [N, {', '.join(map(str, expected))}], got shape "
            f"{shape}{hint}"
        )
    if tokens_bt is None or isinstance(tokens_bt, jax.core.Tracer):
        return
    placeholders = int(np.sum(np.asarray(tokens_bt) == config.image_token_index))
    features = shape[0] * v.tokens_per_tile
    if placeholders != features:
        raise ValueError(
            f"pixel_values: {shape[0]} tiles give {features} image features "
            f"({v.tokens_per_tile} per tile), but the tokens hold {placeholders} image "
            f"placeholders (id {config.image_token_index}); more images than placeholders, "
            "or fewer?"
        )


# ---- modules ----------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    config: Llama4VisionConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = param(self, "scale", (d,), ("norm",), nn.initializers.ones)
        bias = param(self, "bias", (d,), ("norm",), nn.initializers.zeros)
        return layer_norm(x, scale, bias)


class VisionAttention(nn.Module):
    """Non-causal multi-head attention with biases and 2D RoPE (no qk-norm, no GQA)."""

    config: Llama4VisionConfig

    @nn.compact
    def __call__(self, x_nld: Array, rope) -> Array:
        cfg = self.config
        d, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        qkv_axes, bias_axes = (
            ("vision_embed", "vision_heads", "head_dim"),
            ("vision_heads", "head_dim"),
        )
        dtype = x_nld.dtype

        def project(name):
            w = param(self, f"{name}_proj", (d, k, h), qkv_axes, fan_in_init(d))
            b = param(self, f"{name}_bias", (k, h), bias_axes, nn.initializers.zeros)
            return jnp.einsum("nld,dkh->nlkh", x_nld, w.astype(dtype)) + b.astype(dtype)

        q, k_, v = project("q"), project("k"), project("v")
        q, k_ = apply_rope(q, *rope), apply_rope(k_, *rope)
        t = x_nld.shape[1]
        out = dot_product_attention(q, k_, v, jnp.ones((1, t, t), bool))
        wo = param(
            self, "o_proj", (k, h, d), ("vision_heads", "head_dim", "vision_embed"), fan_in_init(d)
        )
        bo = param(self, "o_bias", (d,), ("vision_embed",), nn.initializers.zeros)
        return jnp.einsum("nlkh,khd->nld", out, wo.astype(dtype)) + bo.astype(dtype)


class Linear(nn.Module):
    """x @ kernel (+ bias): a torch Linear with its weight stored transposed ([in, out])."""

    config: Llama4VisionConfig
    features: int
    axes: tuple[str, str]
    use_bias: bool

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d_in = x.shape[-1]
        w = param(self, "kernel", (d_in, self.features), self.axes, fan_in_init(d_in))
        y = jnp.einsum("...i,io->...o", x, w.astype(x.dtype))
        if self.use_bias:
            b = param(self, "bias", (self.features,), self.axes[1:], nn.initializers.zeros)
            y = y + b.astype(x.dtype)
        return y


def gelu(x: Array) -> Array:
    """torch.nn.GELU(): the exact erf form."""
    return jax.nn.gelu(x, approximate=False)


class VisionEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then + fc2(GELU(fc1(LN(x)))); the body of the scan."""

    config: Llama4VisionConfig

    @nn.compact
    def __call__(self, x_nld: Array, rope):
        cfg = self.config
        x_nld = x_nld + VisionAttention(cfg, name="self_attn")(
            LayerNorm(cfg, name="input_layernorm")(x_nld), rope
        )
        h = LayerNorm(cfg, name="post_attention_layernorm")(x_nld)
        h = Linear(cfg, cfg.intermediate_size, ("vision_embed", "vision_mlp"), True, name="fc1")(h)
        h = Linear(cfg, cfg.hidden_size, ("vision_mlp", "vision_embed"), True, name="fc2")(gelu(h))
        return nn.with_logical_constraint(x_nld + h, ACT_NLD), None


def scanned_encoder(config: Llama4VisionConfig) -> type[nn.Module]:
    body = VisionEncoderLayer
    if config.remat_policy != "none":
        body = nn.remat(body, policy=REMAT_POLICY_FNS[config.remat_policy], prevent_cse=False)
    return nn.scan(
        body,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,),
        length=config.num_hidden_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


class Llama4VisionModel(nn.Module):
    """pixel tiles [N, C, S, S] -> adapter features [N, L r^2, projector_output_dim]."""

    config: Llama4VisionConfig

    @nn.compact
    def __call__(self, pixels_nchw: Array) -> Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        d, p = cfg.hidden_size, cfg.patch_size
        with jax.named_scope("patch_embedding"):
            patches = patchify(pixels_nchw.astype(dtype), p)
            w = param(
                self,
                "patch_embedding",
                (cfg.num_channels * p * p, d),
                ("vision_patch", "vision_embed"),
                fan_in_init(cfg.num_channels * p * p),
            )
            x = jnp.einsum("nlp,pd->nld", patches, w.astype(dtype))
        init = nn.initializers.normal(d**-0.5)
        cls = param(self, "class_embedding", (d,), ("vision_embed",), init)
        pos = param(
            self,
            "positional_embedding_vlm",
            (cfg.num_patches + 1, d),
            ("vision_positions", "vision_embed"),
            init,
        )
        cls_n1d = jnp.broadcast_to(cls.astype(dtype), (x.shape[0], 1, d))
        x = jnp.concatenate([x, cls_n1d], axis=1) + pos.astype(dtype)
        x = nn.with_logical_constraint(LayerNorm(cfg, name="layernorm_pre")(x), ACT_NLD)
        angles = jnp.asarray(vision_rope_angles(cfg))[None]  # [1, L+1, H/2]
        rope = (jnp.cos(angles), jnp.sin(angles))
        x, _ = scanned_encoder(cfg)(cfg, name="layers")(x, rope)
        x = LayerNorm(cfg, name="layernorm_post")(x)[:, :-1]  # drop CLS
        with jax.named_scope("vision_adapter"):
            x = pixel_shuffle(x, cfg.pixel_shuffle_ratio)
            axes = ("vision_mlp", "vision_adapter")
            x = gelu(Linear(cfg, cfg.projector_input_dim, axes, False, name="adapter_fc1")(x))
            axes = ("vision_adapter", "vision_adapter_out")
            x = gelu(Linear(cfg, cfg.projector_output_dim, axes, False, name="adapter_fc2")(x))
        return x


class Llama4ForConditionalGeneration(nn.Module):
    """tokens [B, T] int32 and pixel tiles [N, C, S, S] float32 -> logits [B, T, V] float32.

    `apply(variables, tokens, pixel_values=tiles)`: each tile gives `config.vision.
    tokens_per_tile` features, projected to the text hidden size; they replace the embeddings of
    the `<|patch|>` tokens (`config.image_token_index`) in row-major (batch, position) order.
    Other arguments (positions_bt, segment_ids_bt, a KV cache) go to the language model, so
    without `pixel_values` this is `Llama4ForCausalLM` on `params["language_model"]`.
    `method="encode_images"` gives the projected image embeddings [N * tokens_per_tile, D] alone.
    """

    config: Llama4MultimodalConfig

    def setup(self) -> None:
        cfg = self.config
        self.language_model = Llama4ForCausalLM(cfg.text)
        self.vision_model = Llama4VisionModel(cfg.vision)
        self.multi_modal_projector = Linear(
            cfg.vision, cfg.text.hidden_size, ("vision_adapter_out", "embed"), False
        )

    def encode_images(self, pixel_values: Array) -> Array:
        """pixel tiles [N, C, S, S] -> image embeddings [N * tokens_per_tile, D]."""
        check_image_inputs(self.config, None, pixel_values)
        features_nlp = self.vision_model(pixel_values)
        return self.multi_modal_projector(features_nlp.reshape(-1, features_nlp.shape[-1]))

    def __call__(self, tokens_bt: Array, *args, pixel_values: Array | None = None, **kwargs):
        if pixel_values is None:
            return self.language_model(tokens_bt, *args, **kwargs)
        check_image_inputs(self.config, tokens_bt, pixel_values)
        merge = image_merger(self.config, tokens_bt, self.encode_images(pixel_values))
        return self.language_model(tokens_bt, *args, merge_embeds=merge, **kwargs)


def image_merger(
    config: Llama4MultimodalConfig, tokens_bt: Array, image_embeds_md: Array
) -> Callable[[Array], Array]:
    """The `merge_embeds` argument of `Llama4ForCausalLM` that puts `image_embeds_md` (from
    `encode_images`) at the `<|patch|>` tokens of `tokens_bt`."""
    return functools.partial(
        replace_image_embeddings,
        tokens_bt=tokens_bt,
        image_embeds_md=image_embeds_md,
        image_token_id=config.image_token_index,
    )


def dummy_inputs(config: Llama4MultimodalConfig, tiles: int = 1) -> tuple[Array, Array]:
    """Tokens holding one tile's `<|patch|>` tokens and zero pixel tiles, for init/shape runs."""
    v = config.vision
    n = v.tokens_per_tile * tiles
    tokens = jnp.full((1, n + 2), config.image_token_index, jnp.int32).at[:, [0, -1]].set(0)
    pixels = jnp.zeros((tiles, v.num_channels, v.image_size, v.image_size), jnp.float32)
    return tokens, pixels


def init_params(config: Llama4MultimodalConfig, rng: Array | int = 0) -> dict[str, Any]:
    """Random parameters (plain arrays) of the multimodal model."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    tokens, pixels = dummy_inputs(config)
    model = Llama4ForConditionalGeneration(config)
    return nn.unbox(jax.jit(model.init)(rng, tokens, pixel_values=pixels)["params"])


def param_logical_axes(config: Llama4MultimodalConfig) -> dict[str, Any]:
    """Logical axis names of every parameter, as a pytree of PartitionSpecs."""
    tokens, pixels = dummy_inputs(config)
    model = Llama4ForConditionalGeneration(config)
    abstract = jax.eval_shape(
        functools.partial(model.init, pixel_values=pixels), jax.random.key(0), tokens
    )
    return nn.get_partition_spec(abstract)["params"]


def text_model_with_images(
    model: Llama4ForConditionalGeneration, params: dict[str, Any], pixel_values: Any
) -> tuple[Llama4ForCausalLM, dict[str, Any], Array | None]:
    """(text model, its params, image embeddings [M, D] or None) for KV-cache generation: the
    prefill passes `merge_embeds=image_merger(config, tokens, embeddings)` to the text model,
    decode steps run the text model alone."""
    text_model = Llama4ForCausalLM(model.config.text)
    if pixel_values is None:
        return text_model, params["language_model"], None
    pixels = jnp.asarray(pixel_values, jnp.float32)
    check_image_inputs(model.config, None, pixels)
    encode = jax.jit(functools.partial(model.apply, method="encode_images"))
    return text_model, params["language_model"], encode({"params": params}, pixels)
