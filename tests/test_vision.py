"""The multimodal model against transformers' `Llama4ForConditionalGeneration` and Meta's
`llama_models` Transformer with `vision_args`, through their checkpoints, in float32.

transformers 5.24's `Llama4ForConditionalGeneration.forward` raises AttributeError
('image_outputs') once given pixels, after computing the logits; the reference here is that
forward's own composition: `get_image_features` -> `multi_modal_projector` -> `masked_scatter`
at `image_token_index` into the token embeddings -> `language_model(inputs_embeds=...)`.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_reference import MAVERICK_LIKE, SCOUT_LIKE
from meta_reference import TINY_META_PARAMS, build_meta_model, save_meta_checkpoint

import l4jax
from l4jax.config import Llama4Config
from l4jax.convert.mapping import get_path, multimodal_entries
from l4jax.convert.meta import MetaCheckpoint, hf_vision_config_from_args
from l4jax.errors import CheckpointError, ConfigError
from l4jax.preprocess import image_token_ids, preprocess_image
from l4jax.torch_ref import meta_logits, rel_err
from l4jax.vision import (
    Llama4ForConditionalGeneration,
    Llama4VisionModel,
    image_merger,
    init_params,
    param_logical_axes,
    pixel_shuffle,
    vision_rope_angles,
)
from l4jax.vision_config import Llama4MultimodalConfig, Llama4VisionConfig, vision_preset

FP32_TOL = 1e-4
PATCH = 250  # image_token_index of the tiny models (vocab 256)
SPECIALS = {  # stand-ins for the image special tokens inside the tiny vocabularies
    "<|image_start|>": 240,
    "<|image_end|>": 241,
    "<|image|>": 242,
    "<|tile_x_separator|>": 243,
    "<|tile_y_separator|>": 244,
    "<|patch|>": PATCH,
}
TINY = vision_preset("tiny")  # 56px tiles, 4 tokens per tile
DATA = Path(__file__).parent / "data"


def text_config(base: dict[str, Any]) -> Llama4Config:
    return Llama4Config.from_hf_dict(dict(base, num_hidden_layers=4))


def mm_config(base: dict[str, Any], vision: Llama4VisionConfig = TINY) -> Llama4MultimodalConfig:
    return Llama4MultimodalConfig(text_config(base), vision, image_token_index=PATCH)


def prompt(rng: np.random.Generator, pieces: list[Any]) -> list[int]:
    """Text runs (ints: that many random tokens) and images (aspect ratios) in order."""
    ids: list[int] = []
    for piece in pieces:
        if isinstance(piece, int):
            ids += rng.integers(0, 230, piece).tolist()
        else:
            ids += image_token_ids(piece, TINY.tokens_per_tile, SPECIALS)
    return ids


def tiles_of(aspects: list[tuple[int, int]]) -> int:
    return sum(r * c + (r * c > 1) for r, c in aspects)


# ---- the Hugging Face reference ---------------------------------------------------------------


def build_hf(config: Llama4MultimodalConfig, seed: int) -> Any:
    """transformers' model from our config.json dict, every weight random (norms around 1)."""
    hf = config.to_hf_dict()
    for fields in (hf, hf["text_config"]):
        fields.pop("architectures", None)
        fields.pop("torch_dtype")
    model_config = transformers.Llama4Config(**hf)
    model_config.text_config._attn_implementation = "eager"
    model_config.vision_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Llama4ForConditionalGeneration(model_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.rsplit(".", 2)[-2] and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if "embed" in name else 0.08))
    return model


def hf_mm_logits(model: Any, tokens: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """`Llama4ForConditionalGeneration.forward`'s composition (see the module docstring)."""
    ids = torch.from_numpy(np.asarray(tokens, np.int64))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        out = model.get_image_features(pixel_values=torch.from_numpy(pixels), return_dict=True)
        features = out.last_hidden_state
        projected = model.multi_modal_projector(features.view(-1, features.size(-1)))
        mask = model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=projected)
        embeds = embeds.masked_scatter(mask, projected.to(embeds.dtype))
        logits = model.language_model(inputs_embeds=embeds, use_cache=False).logits
    return logits.float().numpy()


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    model = build_hf(mm_config(MAVERICK_LIKE), seed=1)
    path = tmp_path_factory.mktemp("hf_mm")
    model.save_pretrained(path)
    return model, path


CASES = {
    # one image of one tile in a text
    "one_image_one_tile": (SCOUT_LIKE, [[9, (1, 1), 40]]),
    # several images of many tiles (2x2 + global, 1x3 + global, 1), two rows, 70+ tokens:
    # past the chunk (32) and temperature floor (8) boundaries
    "several_images_many_tiles": (
        MAVERICK_LIKE,
        [[3, (2, 2), 11, (1, 1), 7], [20, (1, 3), 4, (1, 1), 1]],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case: str, tmp_path: Path) -> None:
    base, rows = CASES[case]
    config = mm_config(base)
    model = build_hf(config, seed=2)
    model.save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    ids = [prompt(rng, row) for row in rows]
    width = max(map(len, ids))
    tokens = np.array([row + rng.integers(0, 230, width - len(row)).tolist() for row in ids])
    aspects = [p for row in rows for p in row if isinstance(p, tuple)]
    pixels = rng.uniform(-1, 1, (tiles_of(aspects), 3, 56, 56)).astype(np.float32)
    jmodel, params = l4jax.from_pretrained(tmp_path)
    assert isinstance(jmodel, Llama4ForConditionalGeneration)
    assert jmodel.config.image_token_index == PATCH and jmodel.config.vision == TINY
    got = jax.jit(jmodel.apply)(
        {"params": params}, jnp.asarray(tokens), pixel_values=jnp.asarray(pixels)
    )
    assert got.shape == (len(rows), width, base["vocab_size"]) and got.dtype == jnp.float32
    ref = hf_mm_logits(model, tokens, pixels)
    assert rel_err(np.asarray(got), ref) < FP32_TOL
    # the images matter: the reference moves when they are left out
    with torch.no_grad():
        text_only = model.language_model(input_ids=torch.from_numpy(tokens), use_cache=False)
    assert rel_err(text_only.logits.numpy(), ref) > 1e-2


def test_real_tile_geometry_matches_transformers() -> None:
    """336px tiles of a preprocessed image: 24x24 patches, 577 positions, 144 tokens per tile."""
    vision = Llama4VisionConfig(
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        projector_input_dim=48,
        projector_output_dim=48,
        vision_output_dim=48,
    )
    torch.manual_seed(3)
    hf_config = transformers.Llama4VisionConfig(**vision.to_hf_dict())
    hf_config._attn_implementation = "eager"
    hf = transformers.Llama4VisionModel(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            scale = 0.5 if "embedding" in name else 0.1
            p.copy_(torch.randn_like(p) * scale + (1.0 if "norm" in name[-20:] else 0.0))
    from PIL import Image

    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 256, (500, 700, 3), np.uint8))
    tiles = preprocess_image(image).tiles  # 2x3 canvas + global tile
    assert tiles.shape == (7, 3, 336, 336)
    with torch.no_grad():
        ref = hf(torch.from_numpy(tiles)).last_hidden_state.numpy()
    config = Llama4MultimodalConfig(text_config(SCOUT_LIKE), vision)
    params = {
        "vision_model": _params_from_state(
            config, {f"vision_model.{k}": v for k, v in hf.state_dict().items()}
        )["vision_model"]
    }
    got = Llama4VisionModel(vision).apply({"params": params["vision_model"]}, jnp.asarray(tiles))
    assert got.shape == ref.shape == (7, 144, 48)
    assert rel_err(np.asarray(got), ref) < FP32_TOL


def _params_from_state(config: Llama4MultimodalConfig, state: dict[str, Any]) -> dict[str, Any]:
    """The param tree of the entries present in `state` (a torch state dict)."""
    params: dict[str, Any] = {}
    for entry in multimodal_entries(config):
        if entry.hf_key not in state:
            continue
        for slot, array in zip(entry.slots, entry.split(state[entry.hf_key].numpy())):
            node = params
            for name in slot.path[:-1]:
                node = node.setdefault(name, {})
            if slot.group is None:
                node[slot.path[-1]] = array
            else:
                node.setdefault(slot.path[-1], {})[slot.group] = array
    return jax.tree.map(_stack_groups, params, is_leaf=lambda x: _is_groups(x))


def _is_groups(x: Any) -> bool:
    return isinstance(x, dict) and x and all(isinstance(k, int) for k in x)


def _stack_groups(x: Any) -> Any:
    return np.stack([x[i] for i in sorted(x)]) if _is_groups(x) else x


def test_export_direction_reproduces_hf_tensors(hf_checkpoint: tuple[Any, Path]) -> None:
    """Every entry's `join` of the loaded params gives back the HF tensor bit for bit."""
    model, path = hf_checkpoint
    jmodel, params = l4jax.from_pretrained(path)
    state = model.state_dict()
    entries = multimodal_entries(jmodel.config)
    assert {e.hf_key for e in entries} == set(state)
    for entry in entries:
        pieces = []
        for slot in entry.slots:
            array = np.asarray(get_path(params, slot.path))
            pieces.append(array if slot.group is None else array[slot.group])
        np.testing.assert_array_equal(entry.join(tuple(pieces)), state[entry.hf_key].numpy())


def test_encoded_images_merged_into_the_text_model(hf_checkpoint: tuple[Any, Path]) -> None:
    """`encode_images` + `image_merger` (how generation prefills) give the reference logits."""
    model, path = hf_checkpoint
    jmodel, params = l4jax.from_pretrained(path)
    rng = np.random.default_rng(11)
    tokens = np.array([prompt(rng, [6, (1, 2), 5, (1, 1), 8])])
    pixels = rng.uniform(-1, 1, (tiles_of([(1, 2), (1, 1)]), 3, 56, 56)).astype(np.float32)
    encode = jax.jit(functools.partial(jmodel.apply, method="encode_images"))
    embeds = encode({"params": params}, jnp.asarray(pixels))
    with torch.no_grad():
        features = model.get_image_features(pixel_values=torch.from_numpy(pixels)).last_hidden_state
        ref = model.multi_modal_projector(features.reshape(-1, features.shape[-1])).numpy()
    assert embeds.shape == (4 * 4, 64) and rel_err(np.asarray(embeds), ref) < FP32_TOL
    text_model = l4jax.Llama4ForCausalLM(jmodel.config.text)

    @jax.jit
    def text_logits(params, tokens, embeds):
        merge = image_merger(jmodel.config, tokens, embeds)
        return text_model.apply({"params": params}, tokens, merge_embeds=merge)

    got = text_logits(params["language_model"], jnp.asarray(tokens), embeds)
    assert rel_err(np.asarray(got), hf_mm_logits(model, tokens, pixels)) < FP32_TOL


def test_text_only_load_and_logical_axes(hf_checkpoint: tuple[Any, Path]) -> None:
    model, path = hf_checkpoint
    text_model, text_params = l4jax.from_pretrained(path, text_only=True)
    assert isinstance(text_model, l4jax.Llama4ForCausalLM)
    jmodel, params = l4jax.from_pretrained(path)
    assert jmodel.config.text == text_model.config
    for a, b in zip(jax.tree.leaves(text_params), jax.tree.leaves(params["language_model"])):
        np.testing.assert_array_equal(a, b)
    axes = param_logical_axes(jmodel.config)
    assert jax.tree.structure(params) == jax.tree.structure(
        axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    leaves = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    shapes = [x.shape for x in jax.tree.leaves(params)]
    assert all(len(spec) == len(shape) and all(spec) for spec, shape in zip(leaves, shapes))
    assert axes["vision_model"]["layers"]["self_attn"]["q_proj"] == jax.sharding.PartitionSpec(
        "layers", "vision_embed", "vision_heads", "head_dim"
    )
    init = jax.eval_shape(lambda: init_params(jmodel.config, 0))
    assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, params)


# ---- the Meta reference -----------------------------------------------------------------------

VISION_ARGS = {
    "image_size": {"height": 56, "width": 56},
    "patch_size": {"height": 14, "width": 14},
    "dim": 32,
    "n_layers": 2,
    "n_heads": 2,
    "mlp_ratio": 4.0,
    "output_dim": 48,
    "pixel_shuffle_ratio": 0.5,
}
META_PARAMS = dict(TINY_META_PARAMS, vision_args=VISION_ARGS)


@pytest.fixture(scope="module")
def meta_model() -> Any:
    """Meta's Transformer with a vision tower, in float32 (Meta builds the encoder in bf16)."""
    model = build_meta_model(META_PARAMS, seed=6, max_seq_len=96)
    model.float()
    torch.manual_seed(7)
    with torch.no_grad():  # LayerNorm weights around 1 (the text norms already are)
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def meta_mm_logits(model: Any, tokens: np.ndarray, images: list[list[np.ndarray]]) -> np.ndarray:
    """Meta's generation.py prefill: `vision_embeddings` of each sample's images scattered at
    the `<|patch|>` mask, projected, mixed into the token embeddings."""
    from llama_models.llama4.datatypes import MaskedEmbedding, TransformerInput

    ids = torch.as_tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        mask = (ids == PATCH).unsqueeze(-1)
        h = model.tok_embeddings(ids)
        batch = [[torch.from_numpy(t) for t in sample] for sample in images]
        embedding = MaskedEmbedding(embedding=model.vision_embeddings(batch, mask, h), mask=mask)
        inputs = TransformerInput(tokens=ids, tokens_position=0, image_embedding=embedding)
        return model.forward(inputs).logits.float().numpy()


@pytest.mark.parametrize("n_shards, layout", [(1, "plain"), (2, "fused")])
def test_meta_checkpoint_matches_meta_reference(
    meta_model: Any, n_shards: int, layout: str, tmp_path: Path
) -> None:
    path = save_meta_checkpoint(meta_model, META_PARAMS, tmp_path, n_shards, layout)
    jmodel, params = l4jax.from_pretrained(path)
    assert isinstance(jmodel, Llama4ForConditionalGeneration)
    assert jmodel.config.vision == vision_preset("tiny")
    jmodel = Llama4ForConditionalGeneration(
        dataclasses.replace(jmodel.config, image_token_index=PATCH)
    )
    rng = np.random.default_rng(8)
    aspects = [[(1, 2), (1, 1)], [(2, 1)]]
    rows = [[5, aspects[0][0], 12, aspects[0][1], 3], [30, aspects[1][0], 9]]
    ids = [prompt(rng, row) for row in rows]
    width = max(map(len, ids))
    tokens = np.array([row + rng.integers(0, 230, width - len(row)).tolist() for row in ids])
    images = [
        [rng.uniform(-1, 1, (tiles_of([a]), 3, 56, 56)).astype(np.float32) for a in sample]
        for sample in aspects
    ]
    pixels = np.concatenate([t for sample in images for t in sample])
    got = jax.jit(jmodel.apply)(
        {"params": params}, jnp.asarray(tokens), pixel_values=jnp.asarray(pixels)
    )
    ref = meta_mm_logits(meta_model, tokens, images)
    assert rel_err(np.asarray(got), ref) < FP32_TOL
    if n_shards == 1:  # the text model alone, from the same files
        text_model, text_params = l4jax.from_pretrained(path, text_only=True)
        text_tokens = tokens[:, :20] % 230
        got = jax.jit(text_model.apply)({"params": text_params}, jnp.asarray(text_tokens))
        assert rel_err(np.asarray(got), meta_logits(meta_model, text_tokens)) < FP32_TOL


def test_meta_shards_merge_as_llama_models_merges_them(meta_model: Any, tmp_path: Path) -> None:
    """Our 2-way split of the vision tensors is the one `reshard_mp` undoes."""
    from llama_models.checkpoint import reshard_mp

    path = save_meta_checkpoint(meta_model, META_PARAMS, tmp_path, 2, "plain")
    shards = [torch.load(p, weights_only=True) for p in sorted(path.glob("*.pth"))]
    merged = reshard_mp(shards, size=1, rank=0)
    for key, value in meta_model.state_dict().items():
        if key.startswith("vision"):
            torch.testing.assert_close(merged[key], value, rtol=0, atol=0)
    with MetaCheckpoint(path, vision=True) as ckpt:
        assert not [k for k in ckpt.unused_keys() if k.startswith("vision")]
        hf_config = ckpt.hf_config()
        assert hf_config["model_type"] == "llama4"
        assert hf_config["vision_config"] == hf_vision_config_from_args(VISION_ARGS)
    with MetaCheckpoint(path) as ckpt:  # text view: vision tensors set aside
        assert any(k.startswith("vision_projection") for k in ckpt.unused_keys())


# ---- configs ----------------------------------------------------------------------------------


def test_scout_config_and_params_json_agree() -> None:
    hub = json.loads((DATA / "scout_instruct_config.json").read_text())
    config = Llama4MultimodalConfig.from_hf_dict(hub)
    assert config.vision == vision_preset("scout") == Llama4VisionConfig()
    assert (config.vision.tokens_per_tile, config.vision.num_patches) == (144, 576)
    assert config.image_token_index == 200092
    scout_args = dict(
        VISION_ARGS,
        image_size={"height": 336, "width": 336},
        dim=1408,
        n_layers=34,
        n_heads=16,
        output_dim=4096,
    )
    vision = Llama4VisionConfig.from_hf_dict(hf_vision_config_from_args(scout_args))
    assert vision == config.vision
    again = Llama4MultimodalConfig.from_hf_dict(config.to_hf_dict())
    assert again == config
    hf = transformers.Llama4Config(**{k: v for k, v in config.to_hf_dict().items()})
    assert Llama4MultimodalConfig.from_hf_dict(hf.to_dict()) == config


def test_bad_configs_raise() -> None:
    with pytest.raises(ConfigError, match="intermediate_size: 100 must equal"):
        Llama4VisionConfig(intermediate_size=100)
    with pytest.raises(ConfigError, match="head_dim 6 must be divisible by 4"):
        Llama4VisionConfig(hidden_size=12, intermediate_size=48, num_attention_heads=2)
    with pytest.raises(ConfigError, match="patch_size: 15 does not divide"):
        Llama4VisionConfig(patch_size=15)
    with pytest.raises(ConfigError, match="norm_eps"):
        Llama4VisionConfig.from_hf_dict({"norm_eps": 1e-6})
    with pytest.raises(ConfigError, match="only square"):
        Llama4VisionConfig.from_hf_dict({"image_size": [336, 448]})
    with pytest.raises(ConfigError, match="intermediate_size: 64 must equal .* = 128"):
        Llama4VisionConfig.from_hf_dict(hf_vision_config_from_args(dict(VISION_ARGS, mlp_ratio=2)))
    with pytest.raises(CheckpointError, match="vision_args.image_size must be square"):
        hf_vision_config_from_args(dict(VISION_ARGS, image_size={"height": 56, "width": 28}))


# ---- numerics and bad input -------------------------------------------------------------------


def test_pixel_shuffle_and_rope_match_transformers() -> None:
    from transformers.models.llama4 import modeling_llama4 as hf

    x = np.random.default_rng(9).normal(size=(3, 36, 40)).astype(np.float32)
    ref = hf.pixel_shuffle(torch.from_numpy(x), 0.5).numpy()
    np.testing.assert_array_equal(np.asarray(pixel_shuffle(jnp.asarray(x), 0.5)), ref)
    for vision in (TINY, vision_preset("scout")):
        hf_config = transformers.Llama4VisionConfig(**vision.to_hf_dict())
        freqs = hf.Llama4VisionRotaryEmbedding._compute_freqs_ci(hf_config)
        ref = torch.angle(freqs[:, 0]).numpy()  # |freqs| == 1: the rotation angles mod 2 pi
        ours = vision_rope_angles(vision)
        wrapped = np.angle(np.exp(1j * ours.astype(np.float64)))
        np.testing.assert_allclose(wrapped, ref, atol=2e-5)


def test_bad_pixels_and_placeholder_counts_raise(hf_checkpoint: tuple[Any, Path]) -> None:
    _, path = hf_checkpoint
    jmodel, params = l4jax.from_pretrained(path)
    rng = np.random.default_rng(10)
    tokens = jnp.asarray([prompt(rng, [4, (1, 1), 4])], jnp.int32)
    one_tile = jnp.zeros((1, 3, 56, 56))
    apply = jmodel.apply
    with pytest.raises(ValueError, match=r"pixel_values: .* \(4 channels, the model takes 3\)"):
        apply({"params": params}, tokens, pixel_values=jnp.zeros((1, 4, 56, 56)))
    with pytest.raises(ValueError, match=r"expected tiles \[N, 3, 56, 56\], got shape"):
        apply({"params": params}, tokens, pixel_values=jnp.zeros((1, 3, 336, 336)))
    with pytest.raises(ValueError, match="2 tiles give 8 image features .* hold 4 image"):
        apply(
            {"params": params}, tokens, pixel_values=jnp.zeros((2, 3, 56, 56))
        )  # more images than slots
    with pytest.raises(ValueError, match="1 tiles give 4 image features .* hold 0 image"):
        apply({"params": params}, tokens % 200, pixel_values=one_tile)
    with pytest.raises(ValueError, match="expected tiles"):
        jax.jit(apply)({"params": params}, tokens, pixel_values=jnp.zeros((1, 1, 56, 56)))


# ---- generation with images -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A multimodal checkpoint with the default tokenizer's vocabulary and two pictures: wide
    (1x2 tiles + global) and small (one tile)."""
    from PIL import Image

    from l4jax.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("cli")
    text = Llama4Config.from_hf_dict(
        dict(MAVERICK_LIKE, num_hidden_layers=2, vocab_size=Tokenizer.default().n_words)
    )
    build_hf(Llama4MultimodalConfig(text, TINY), seed=12).save_pretrained(path / "ckpt")
    rng = np.random.default_rng(13)
    for name, shape in (("wide.png", (40, 90, 3)), ("small.png", (30, 30, 3))):
        Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(path / name)
    return path / "ckpt", path / "wide.png", path / "small.png"


@pytest.mark.slow  # the CLI end to end; the image path in-process is in the default suite
def test_generate_cli_with_image(
    cli_checkpoint: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """`l4jax generate --image` streams what `generate` gives, whose prefill (text model + image
    embeddings merged at the patches) has the multimodal model's logits."""
    from l4jax.cli import main
    from l4jax.decoding import generate
    from l4jax.image_prompts import image_generation_inputs
    from l4jax.preprocess import ImageProcessor
    from l4jax.tokenizer import Tokenizer

    ckpt, image, _ = cli_checkpoint
    tok = Tokenizer.default()
    args = ["generate", "--checkpoint", str(ckpt), "--prompt", "Describe:"]
    args += ["--image", str(image), "--max-new-tokens", "2", "--temperature", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    jmodel, params = l4jax.from_pretrained(ckpt)
    ids, pixels = ImageProcessor(TINY, tok.special_tokens).encode_completion(
        tok, "Describe:", [image]
    )
    assert pixels.shape == (3, 3, 56, 56) and ids.count(200092) == 3 * 4  # 1x2 tiles + global
    text_model, text_params, prompt_ids, kwargs = image_generation_inputs(
        jmodel, params, tok, [image], text="Describe:"
    )
    assert prompt_ids == ids
    new, logits = generate(
        text_model, text_params, [ids], 2, on_token=lambda t: None, pad_to_multiple_of=64,
        return_logits=True, **kwargs,
    )  # fmt: skip
    full = jax.jit(jmodel.apply)({"params": params}, jnp.asarray([ids]), pixel_values=pixels)
    assert rel_err(logits[0, 0], np.asarray(full[0, -1])) < FP32_TOL
    before_stop = itertools.takewhile(lambda t: t not in tok.stop_tokens, new[0, -2:].tolist())
    assert out == tok.decode(list(before_stop)) + "\n"  # what the CLI streamed
    with pytest.raises(SystemExit):  # --image needs --prompt or --chat-json, as before
        main(["generate", "--checkpoint", str(ckpt), "--image", str(image)])
    with pytest.raises(ConfigError, match="images need a multimodal checkpoint"):
        image_generation_inputs(text_model, text_params, tok, [image], text="x")


@pytest.mark.slow  # four CLI runs
def test_generate_and_chat_with_images_on_a_sequence_mesh(
    cli_checkpoint: tuple[Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    traced_lengths: Any,
) -> None:
    """`--mesh data=2,sequence=4` with images: the vision tower on one device, the text model
    on the mesh, the prompt (image embeddings merged) through the ring; greedy text equal to
    one device's, for `generate` and for a two-turn `chat` with an image. From an l4jax
    checkpoint, whose params load onto one device (so do the image embeddings)."""
    from l4jax.cli import main
    from l4jax.convert.conversion import convert_checkpoint

    ring = traced_lengths("self_attention")  # what went through context-parallel attention
    hf, wide, small = cli_checkpoint
    ckpt = tmp_path / "l4jax"
    convert_checkpoint(hf, ckpt, progress=False)
    common = ["--checkpoint", str(ckpt), "--max-new-tokens", "3", "--temperature", "0"]
    runs = [
        (["generate", *common, "--prompt", "Describe:", "--image", str(wide)], ""),
        (["chat", *common, "--image", str(small)], "What is it?\nAnd now?\n"),
    ]
    for args, stdin in runs:
        outputs = []
        for mesh in ([], ["--mesh", "data=2,sequence=4"]):
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
            ring.clear()
            jax.clear_caches()  # (so that prefill traces again: `ring` sees it)
            assert main(args + mesh) == 0
            outputs.append(capsys.readouterr().out)
            assert bool(ring) == bool(mesh), (args[0], ring)
        assert outputs[0] == outputs[1] and outputs[0].strip(), args[0]


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_cli_pixel_dtype_reaches_the_image_processor(
    cli_checkpoint: tuple[Path, Path, Path], command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--pixel-dtype bfloat16` gives the model HF's bfloat16-rounded pixels (default float32)."""
    import ml_dtypes

    import l4jax.image_prompts
    from l4jax.cli import main

    ckpt, image, _ = cli_checkpoint
    seen = []

    class Encoded(Exception):
        pass

    def spy(model, params, pixel_values):  # (the vision tower's input)
        seen.append(pixel_values)
        raise Encoded  # (no generation: the pixels are what this test is about)

    monkeypatch.setattr(l4jax.image_prompts, "image_generation_model", spy)
    args = [command, "--checkpoint", str(ckpt), "--image", str(image)]
    args += ["--prompt", "Describe:"] if command == "generate" else []
    for extra in ([], ["--pixel-dtype", "bfloat16"]):
        monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))  # (chat: one user turn)
        with pytest.raises(Encoded):
            main(args + extra)
    f32, bf16 = seen
    assert f32.dtype == bf16.dtype == np.float32 and f32.shape == bf16.shape == (3, 3, 56, 56)
    np.testing.assert_array_equal(bf16, bf16.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert not np.array_equal(f32, bf16)
    np.testing.assert_allclose(bf16, f32, atol=0.02)


def reference_chat(ckpt: Path, system: str, user_turns: list[Any]) -> tuple[str, list[int]]:
    """What `l4jax chat --max-new-tokens 2 --temperature 0` prints for these user turns (their
    content holding images), from the multimodal model: each turn's whole dialog encoded,
    its images embedded, greedy. Returns (stdout, image patch tokens per turn)."""
    from l4jax.decoding import generate
    from l4jax.preprocess import ImageProcessor
    from l4jax.tokenizer import Message, Tokenizer
    from l4jax.vision import text_model_with_images

    tok = Tokenizer.default()
    jmodel, params = l4jax.from_pretrained(ckpt)
    processor = ImageProcessor(TINY, tok.special_tokens)
    dialog, expected, patches = [Message("system", system)], "", []
    for user in user_turns:
        dialog.append(user)
        ids, pixels = processor.encode_dialog_prompt(tok, dialog)
        patches.append(ids.count(200092))
        text_model, text_params, embeds = text_model_with_images(jmodel, params, pixels)
        new = generate(
            text_model, text_params, [ids], 2, pad_to_multiple_of=64, stop_ids=tok.stop_tokens,
            on_token=lambda t: None,  # streamed like the CLI: the same compiled loop
            image_embeds=embeds, image_token_id=200092,
        )[0, -2:].tolist()  # fmt: skip
        reply = list(itertools.takewhile(lambda t: t not in tok.stop_tokens, new))
        stop = None if len(reply) == len(new) else new[len(reply)]
        reason = {None: "out_of_tokens", tok.eom_id: "end_of_message"}.get(stop, "end_of_turn")
        dialog.append(Message("assistant", tok.decode(reply), stop_reason=reason))
        expected += f"assistant> {tok.decode(reply)}\n"
    return expected, patches


def test_chat_image_command_adds_images_mid_dialog(
    cli_checkpoint: tuple[Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`/image PATH` puts an image in the next user turn (at its placeholders, else before
    its text); the earlier turns keep theirs. A bad `/image` or a placeholder mismatch skips
    that line with a one-line error, the chat goes on, and the exit code is 2."""
    from l4jax.cli import main
    from l4jax.generate_cli import chat_loop
    from l4jax.tokenizer import Message, Tokenizer

    ckpt, wide, small = cli_checkpoint
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not a picture")
    lines = [
        "Describe <|image|>.",
        f"/image {garbage}",  # refused: not queued
        f"/image {small}",
        "<|image|> and <|image|>?",  # one image queued for two placeholders: skipped
        "And this one?",
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{t}\n" for t in lines)))
    args = ["chat", "--checkpoint", str(ckpt), "--image", str(wide), "--system", "Be brief."]
    assert main([*args, "--max-new-tokens", "2", "--temperature", "0"]) == 2
    captured = capsys.readouterr()
    turns = [
        Message("user", ["Describe ", wide, "."]),
        Message("user", [small, "And this one?"]),
    ]
    expected, patches = reference_chat(ckpt, "Be brief.", turns)
    assert patches == [3 * 4, (3 + 1) * 4]
    first, second = expected.splitlines(keepends=True)
    assert captured.out == first + f"(image {small}: in your next message)\n" + second
    errors = re.findall(r"l4jax chat: error: .*", captured.err)
    assert len(errors) == 2, captured.err
    assert errors[0].startswith(f"l4jax chat: error: {garbage}: not an image file")
    assert errors[1] == (
        "l4jax chat: error: 1 image(s) for 2 <|image|> placeholder(s) in this user turn"
    )
    # a text-only model has no images to add
    dialog, skipped = chat_loop(None, None, Tokenizer.default(), iter(["/image x.png\n"]), print)
    assert (dialog, skipped) == ([], 1)
    assert "images need a multimodal checkpoint" in capsys.readouterr().err


def test_chat_cli_with_images(
    cli_checkpoint: tuple[Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`l4jax chat --image A --image B`: the images sit at the `<|image|>` placeholders of the
    first user turn in every turn's prompt (Meta's chat format), each reply is what `generate`
    gives with their embeddings; bad input is a one-line error and exit code 2."""
    from l4jax.cli import main
    from l4jax.tokenizer import Message, Tokenizer

    ckpt, wide, small = cli_checkpoint
    tok = Tokenizer.default()
    opts = ["--max-new-tokens", "2", "--temperature", "0", "--system", "Be brief."]
    args = ["chat", "--checkpoint", str(ckpt), "--image", str(wide), "--image", str(small), *opts]
    turns = ["Compare <|image|> with <|image|>.", "Which is larger?"]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{t}\n" for t in turns)))
    assert main(args) == 0
    out = capsys.readouterr().out
    # the reference: every turn's dialog encoded with the images in the first user message
    first = Message("user", ["Compare ", wide, " with ", small, "."])
    expected, patches = reference_chat(ckpt, "Be brief.", [first, Message("user", turns[1])])
    assert patches == [(3 + 1) * 4] * 2  # 1x2 tiles + global, one tile: 4 patches each
    assert out == expected
    # bad input: an unreadable image (refused before loading), more images than placeholders,
    # a vision tower that does not take 3 channels

    def fails(argv: list[str], stdin: str, message: str) -> None:
        capsys.readouterr()
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        assert main(["chat", *argv]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # stderr: the loader's progress bar, then one line
        line = f"(^|[\r\n])l4jax chat: error: [^\r\n]*{message}[^\r\n]*\n\\Z"
        assert re.search(line, captured.err), captured.err

    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not a picture")
    fails(["--preset", "tiny", "--image", str(garbage)], "hi\n", "garbage.png: not an image file")
    many = r"2 image\(s\) for 1 <\|image\|> placeholder\(s\) in this user turn"
    fails(args[1:], "Only <|image|> here\n", many)
    text = Llama4Config.from_hf_dict(
        dict(MAVERICK_LIKE, num_hidden_layers=1, vocab_size=tok.n_words)
    )
    rgba_tower = Llama4MultimodalConfig(text, TINY.replace(num_channels=4))
    build_hf(rgba_tower, seed=3).save_pretrained(tmp_path / "four")
    four = ["--checkpoint", str(tmp_path / "four"), "--image", str(wide)]
    fails(four, "hi\n", "vision_config.num_channels: 4, but images are preprocessed to RGB")
