"""`l4jax convert` of multimodal checkpoints (text model + vision tower + projector), every
direction: HF <-> l4jax, Meta -> l4jax / HF, in-memory params -> HF, and `from_pretrained` of
the result. The references (transformers' and Meta's multimodal models) are test_vision's."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_reference import MAVERICK_LIKE
from meta_reference import save_meta_checkpoint
from safetensors.numpy import save_file
from test_convert import assert_bit_identical, convert_fails, read_hf, small_pieces  # noqa: F401
from test_vision import (
    META_PARAMS,
    PATCH,
    build_hf,
    hf_mm_logits,
    meta_mm_logits,
    mm_config,
    prompt,
)
from test_vision import meta_model as meta_vision_model  # noqa: F401 (the fixture)

import l4jax
from l4jax.cli import main
from l4jax.convert import export_hf, restore_params
from l4jax.model import Llama4ForCausalLM
from l4jax.torch_ref import rel_err
from l4jax.vision import Llama4ForConditionalGeneration

FP32_TOL = 1e-4


def inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[list[np.ndarray]]]:
    """Tokens [2, T] with three images' `<|patch|>` runs, their pixel tiles, per sample."""
    rng = np.random.default_rng(seed)
    aspects = [[(1, 2)], [(1, 1), (1, 1)]]
    rows = [[4, aspects[0][0], 9], [3, aspects[1][0], 5, aspects[1][1], 2]]
    ids = [prompt(rng, row) for row in rows]
    width = max(map(len, ids))
    tokens = np.array([row + [7] * (width - len(row)) for row in ids])
    images = [
        [rng.uniform(-1, 1, (r * c + (r * c > 1), 3, 56, 56)).astype(np.float32) for r, c in a]
        for a in aspects
    ]
    return tokens, np.concatenate([t for sample in images for t in sample]), images


def l4jax_logits(path: Path, tokens: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    model, params = l4jax.from_pretrained(path, dtype="float32")
    assert isinstance(model, Llama4ForConditionalGeneration)
    model = Llama4ForConditionalGeneration(model.config.replace(image_token_index=PATCH))
    apply = jax.jit(model.apply)
    return np.asarray(apply({"params": params}, jnp.asarray(tokens), pixel_values=pixels))


def load_transformers(path: Path) -> Any:
    model = transformers.Llama4ForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager"
    ).eval()
    model.config.image_token_index = PATCH  # (a Meta checkpoint's id is outside the tiny vocab)
    return model


def convert(src: Path, dst: Path, *args: str) -> Path:
    assert main(["convert", str(src), str(dst), *args]) == 0
    return dst


# ---- HF <-> l4jax -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_mm(tmp_path_factory) -> tuple[Any, dict[str, Path]]:
    """transformers' multimodal model, saved in float32 and bfloat16 (several files)."""
    model = build_hf(mm_config(MAVERICK_LIKE), seed=1)
    root = tmp_path_factory.mktemp("hf_mm")
    model.save_pretrained(root / "float32", max_shard_size="500KB")
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf16.save_pretrained(root / "bfloat16", max_shard_size="500KB")
    return model, {"float32": root / "float32", "bfloat16": root / "bfloat16"}


@pytest.fixture(scope="module")
def round_trip(hf_mm, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """dtype -> (l4jax checkpoint, its HF export) of each saved model."""
    root = tmp_path_factory.mktemp("round_trip")
    out = {}
    for dtype, src in hf_mm[1].items():
        l4 = convert(src, root / f"l4jax-{dtype}")
        out[dtype] = l4, convert(l4, root / f"hf-{dtype}", "--to", "hf")
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_l4jax_hf_round_trip_is_bit_identical(hf_mm, round_trip, dtype):
    l4, hf = round_trip[dtype]
    stored = json.loads((l4 / "config.json").read_text())
    assert stored["model_type"] == "llama4" and stored["torch_dtype"] == dtype
    assert stored["vision_config"]["num_hidden_layers"] == 2
    assert (l4 / "params" / "vision_model.layers.self_attn.q_proj").is_dir()
    want = read_hf(hf_mm[1][dtype])
    assert any(k.startswith("vision_model.") for k in want)
    assert_bit_identical(read_hf(hf), want)


def test_export_gives_transformers_the_same_image_features_and_logits(hf_mm, round_trip):
    model = hf_mm[0]
    exported = load_transformers(round_trip["float32"][1])
    tokens, pixels, _ = inputs()
    with torch.no_grad():
        features = [
            m.get_image_features(pixel_values=torch.from_numpy(pixels), return_dict=True)
            for m in (model, exported)
        ]
    assert torch.equal(features[0].last_hidden_state, features[1].last_hidden_state)
    ref = hf_mm_logits(model, tokens, pixels)
    assert np.array_equal(hf_mm_logits(exported, tokens, pixels), ref)
    assert rel_err(l4jax_logits(round_trip["float32"][0], tokens, pixels), ref) < FP32_TOL


def test_from_pretrained_text_only_and_in_memory_export(hf_mm, round_trip, tmp_path):
    l4 = round_trip["float32"][0]
    config, params = restore_params(l4)
    text_model, text_params = l4jax.from_pretrained(l4, text_only=True)
    assert isinstance(text_model, Llama4ForCausalLM) and text_model.config == config.text
    assert jax.tree.all(jax.tree.map(np.array_equal, text_params, params["language_model"]))
    export_hf(params, config, tmp_path / "hf", max_shard_bytes=300_000, progress=False)
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    assert_bit_identical(read_hf(tmp_path / "hf"), read_hf(hf_mm[1]["float32"]))


# ---- Meta -> l4jax, Meta -> HF -----------------------------------------------------------------


def test_meta_checkpoint_converts_to_l4jax_and_hf(meta_vision_model, tmp_path):  # noqa: F811
    """Two fused model-parallel shards, vision tensors split as Meta splits them."""
    src = save_meta_checkpoint(meta_vision_model, META_PARAMS, tmp_path / "meta", 2, "fused")
    tokens, pixels, images = inputs(1)
    ref = meta_mm_logits(meta_vision_model, tokens, images)
    l4 = convert(src, tmp_path / "l4jax")
    assert rel_err(l4jax_logits(l4, tokens, pixels), ref) < FP32_TOL
    hf = convert(src, tmp_path / "hf", "--to", "hf")
    assert rel_err(hf_mm_logits(load_transformers(hf), tokens, pixels), ref) < FP32_TOL
    assert_bit_identical(read_hf(convert(l4, tmp_path / "hf2", "--to", "hf")), read_hf(hf))


# ---- bad input --------------------------------------------------------------------------------

LAYER = "vision_model.model.layers.1."


def edited_hf(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = read_hf(src)
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.pop(LAYER + "mlp.fc2.bias"), f"missing tensor '{LAYER}mlp.fc2.bias'"),
        (
            lambda t: t.update({LAYER + "self_attn.q_proj.bias": np.zeros(3, np.float32)}),
            f"model.safetensors: tensor '{LAYER}self_attn.q_proj.bias' has shape (3,), "
            "config expects (32,)",
        ),
    ],
    ids=["missing", "shape"],
)
def test_bad_hf_vision_tensors(hf_mm, tmp_path, capsys, edit, match):
    src = edited_hf(hf_mm[1]["float32"], tmp_path / "src", edit)
    convert_fails(capsys, src, tmp_path / "out" / "dst", match)


def test_bad_meta_vision_tensors(meta_vision_model, tmp_path, capsys):  # noqa: F811
    src = save_meta_checkpoint(meta_vision_model, META_PARAMS, tmp_path / "meta")
    shard = src / "consolidated.00.pth"
    state = torch.load(shard, weights_only=True)
    key = "vision_embeddings.vision_encoder.transformer.resblocks.1.mlp.c_proj.bias"
    state[key] = state[key][:5]
    torch.save(state, shard)
    convert_fails(capsys, src, tmp_path / "out" / "dst", f"{shard}: tensor {key} has shape (5,)")
    del state[key]
    torch.save(state, shard)
    match = f"{shard}: missing tensor {key}"
    convert_fails(capsys, src, tmp_path / "out" / "dst", match, "--to", "hf")
