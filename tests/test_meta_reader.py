"""MetaCheckpoint: Meta's original checkpoints read as HF tensors, proven against both references.

The proof of the name/layout mapping and of the params.json -> HF config translation: the HF
tensors, loaded strictly into a transformers `Llama4ForCausalLM` built from `hf_config()`,
reproduce the logits of Meta's own `llama_models` Transformer over 48 tokens (past the chunk
and temperature-tuning boundaries of the tiny configs), for 1 and 2 shards, plain and fused keys.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from llama_models.checkpoint import convert_moe_weights, reshard_mp
from llama_models.llama4.moe import MoE
from transformers import Llama4ForCausalLM, Llama4TextConfig

from l4jax.convert.meta import (
    CheckpointFileNotFoundError,
    MetaCheckpoint,
    hf_config_from_params,
)
from l4jax.errors import CheckpointError
from tests.meta_reference import (
    TINY_META_PARAMS,
    TINY_META_PARAMS_ALL_MOE,
    build_meta_model,
    meta_logits,
    save_meta_checkpoint,
)

PARAMS = {"interleaved": TINY_META_PARAMS, "all_moe": TINY_META_PARAMS_ALL_MOE}
TOKENS = np.random.default_rng(0).integers(0, 256, size=(2, 48))  # [B, T]
LAYOUTS = [(n, layout) for n in (1, 2) for layout in ("plain", "fused")]
MakeCheckpoint = Callable[..., Path]


@functools.cache
def reference(name: str) -> tuple[torch.nn.Module, np.ndarray]:
    """Meta's model for PARAMS[name] and its logits [B, T, V] on TOKENS."""
    model = build_meta_model(PARAMS[name], seed=0)
    return model, meta_logits(model, TOKENS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> MakeCheckpoint:
    """(name, n_shards, layout, dtype=None) -> a checkpoint directory, written once."""

    @functools.cache
    def make(name: str, n_shards: int, layout: str, dtype: torch.dtype | None = None) -> Path:
        path = tmp_path_factory.mktemp(f"{name}-{n_shards}-{layout}")
        return save_meta_checkpoint(reference(name)[0], PARAMS[name], path, n_shards, layout, dtype)

    return make


def read_all(path: Path) -> dict[str, np.ndarray]:
    with MetaCheckpoint(path) as ckpt:
        names = ckpt.keys()
        return {key: ckpt.get(key) for key in names}


def copy_of(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst / "ckpt"))


# ---- the mapping, proven by logits ----------------------------------------------------------


@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize(("n_shards", "layout"), LAYOUTS)
def test_hf_model_from_checkpoint_matches_meta_logits(
    checkpoint: MakeCheckpoint, name: str, n_shards: int, layout: str
) -> None:
    _, expected = reference(name)
    with MetaCheckpoint(checkpoint(name, n_shards, layout)) as ckpt:
        hf = Llama4ForCausalLM(Llama4TextConfig(**ckpt.hf_config())).eval()
        hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
        assert sorted(ckpt.keys()) == sorted(hf_shapes)
        tensors = {}
        names = ckpt.keys()
        for key in names:
            array = ckpt.get(key)
            assert array.shape == ckpt.shape(key) == hf_shapes[key], key
            assert array.dtype == ckpt.dtype(key) == np.float32, key
            tensors[key] = torch.from_numpy(array)
    hf.load_state_dict(tensors, strict=True)
    with torch.no_grad():
        logits = hf(input_ids=torch.as_tensor(TOKENS), use_cache=False).logits.numpy()
    assert np.abs(logits - expected).max() / np.abs(expected).max() < 1e-5


@pytest.mark.parametrize("name", PARAMS)
def test_every_layout_and_shard_count_reads_identical_tensors(
    checkpoint: MakeCheckpoint, name: str
) -> None:
    baseline = read_all(checkpoint(name, 1, "plain"))
    for n_shards, layout in LAYOUTS[1:]:
        tensors = read_all(checkpoint(name, n_shards, layout))
        assert tensors.keys() == baseline.keys()
        for key, array in tensors.items():
            assert np.array_equal(array, baseline[key]), (n_shards, layout, key)


@pytest.mark.parametrize("name", PARAMS)
def test_fused_shards_merge_back_with_llama_models_resharding(
    checkpoint: MakeCheckpoint, name: str
) -> None:
    """The 2-shard fused files are what llama_models/checkpoint.py merges into the model."""
    model, _ = reference(name)
    files = sorted(checkpoint(name, 2, "fused").glob("consolidated.*.pth"))
    experts = PARAMS[name]["moe_args"]["num_experts"]
    shards = [convert_moe_weights(torch.load(f, weights_only=True), experts) for f in files]
    fresh = build_meta_model(PARAMS[name], seed=1)
    fresh.load_state_dict(reshard_mp(shards, size=1, rank=0), strict=True)
    merged = fresh.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(merged[key], value), key


def test_bf16_reads_as_ml_dtypes_bfloat16(checkpoint: MakeCheckpoint) -> None:
    f32 = read_all(checkpoint("interleaved", 1, "plain"))
    with MetaCheckpoint(checkpoint("interleaved", 2, "fused", torch.bfloat16)) as ckpt:
        names = ckpt.keys()
        for key in names:
            array = ckpt.get(key)
            assert ckpt.dtype(key) == array.dtype == np.dtype(ml_dtypes.bfloat16), key
            rounded = f32[key].astype(ml_dtypes.bfloat16)  # round-to-nearest-even, as torch
            assert np.array_equal(array.view(np.uint16), rounded.view(np.uint16)), key


# ---- params.json -> HF config ---------------------------------------------------------------


@pytest.mark.parametrize("name", PARAMS)
def test_hf_config_matches_meta_model_structure(name: str) -> None:
    model, _ = reference(name)
    config = hf_config_from_params(PARAMS[name])
    layers = list(model.layers)
    assert config["moe_layers"] == [
        i for i, layer in enumerate(layers) if isinstance(layer.feed_forward, MoE)
    ]
    assert config["no_rope_layers"] == [int(not layer.is_nope_layer) for layer in layers]
    assert [int(layer.attention.use_qk_norm) for layer in layers] == [
        int(config["use_qk_norm"] and rope) for rope in config["no_rope_layers"]
    ]
    moe = layers[config["moe_layers"][0]].feed_forward
    assert (
        config["intermediate_size"]
        == moe.experts.w1.shape[-1]
        == moe.shared_expert.w1.weight.shape[0]
    )
    dense = [layer.feed_forward for layer in layers if not isinstance(layer.feed_forward, MoE)]
    for ffn in dense:
        assert config["intermediate_size_mlp"] == ffn.w1.weight.shape[0]


def test_hf_config_of_interleaved_params() -> None:
    config = hf_config_from_params(TINY_META_PARAMS)
    assert config["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 64.0,
        "original_max_position_embeddings": 8192,
    }
    assert config["layer_types"] == ["chunked_attention"] * 3 + ["full_attention"]
    assert (config["floor_scale"], config["attention_chunk_size"]) == (16, 16)
    assert (config["intermediate_size"], config["intermediate_size_mlp"]) == (112, 224)
    hf = Llama4TextConfig(**config)
    assert hf.rope_parameters["rope_theta"] == 500000.0
    assert hf.no_rope_layers == [1, 1, 1, 0] and hf.moe_layers == [1, 3]


def test_hf_config_applies_model_args_defaults() -> None:
    params = {"dim": 256, "n_layers": 2, "n_heads": 4, "use_scaled_rope": True}
    config = hf_config_from_params(params)
    assert config["rope_scaling"]["factor"] == 16.0  # ModelArgs.validate defaults
    assert config["rope_scaling"]["high_freq_factor"] == 1.0
    assert config["vocab_size"] == 202048  # -1: generation.py takes the tokenizer's size
    assert config["num_key_value_heads"] == 4 and config["head_dim"] == 64
    assert config["intermediate_size_mlp"] == 768  # 4*256 -> 682 -> multiple_of 256
    assert config["moe_layers"] == [] and config["no_rope_layers"] == [1, 1]
    assert not config["use_qk_norm"] and not config["attn_temperature_tuning"]
    assert config["floor_scale"] == 8192 and config["attention_chunk_size"] is None


def test_hf_config_gives_published_maverick_sizes() -> None:
    params = {
        "dim": 5120,
        "n_layers": 48,
        "n_heads": 40,
        "n_kv_heads": 8,
        "vocab_size": 202048,
        "multiple_of": 2048,
        "ffn_dim_multiplier": 1.2,
        "ffn_exp": 4,
        "nope_layer_interval": 4,
        "attention_chunk_size": 8192,
        "moe_args": {"num_experts": 128, "top_k": 1, "interleave_moe_layer_step": 2},
    }
    config = hf_config_from_params(params)
    assert (config["intermediate_size"], config["intermediate_size_mlp"]) == (8192, 16384)
    assert config["head_dim"] == 128 and config["moe_layers"] == list(range(1, 48, 2))
    assert config["no_rope_layers"].count(0) == 12 and config["no_rope_layers"][3] == 0


# ---- extra keys -----------------------------------------------------------------------------


def test_vision_and_auxiliary_keys_are_listed_as_unused(tmp_path: Path) -> None:
    extra: dict[str, Any] = {
        "rope.freqs": torch.zeros(8),
        "vision_embeddings.vision_encoder.ln_pre.weight": torch.ones(4),
        "vision_projection.weight": torch.ones(64, 4),
        "layers.0.attention.wqkv._extra_state": io.BytesIO(b"fp8 state"),
    }
    model, _ = reference("interleaved")
    path = save_meta_checkpoint(model, TINY_META_PARAMS, tmp_path, 2, "fused", extra=extra)
    with MetaCheckpoint(path) as ckpt:
        assert ckpt.unused_keys() == sorted(extra)
        assert not set(ckpt.keys()) & set(extra)
        location = ckpt.location("model.layers.0.self_attn.k_proj.weight")
        assert "consolidated.01.pth" in location and "layers.0.attention.wqkv.weight" in location
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.get("lm_head.weight")


# ---- errors ---------------------------------------------------------------------------------


def assert_open_fails(path: Path, error: type[Exception], match: str) -> None:
    """Opening `path` raises `error` with a one-line message matching `match`."""
    with pytest.raises(error, match=match) as info:
        MetaCheckpoint(path)
    assert "\n" not in str(info.value)


def test_missing_params_json(tmp_path: Path) -> None:
    assert_open_fails(tmp_path, CheckpointFileNotFoundError, r"params\.json: not found")
    assert issubclass(CheckpointFileNotFoundError, FileNotFoundError)


def test_no_shard_files(tmp_path: Path) -> None:
    (tmp_path / "params.json").write_text(json.dumps(TINY_META_PARAMS))
    assert_open_fails(tmp_path, CheckpointFileNotFoundError, "no consolidated.NN.pth")


def test_shard_numbering_gap(checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    path = copy_of(checkpoint("interleaved", 2, "plain"), tmp_path)
    (path / "consolidated.01.pth").rename(path / "consolidated.02.pth")
    assert_open_fails(path, CheckpointError, r"not numbered 00\.\.01")


def test_shard_count_that_does_not_divide(checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    path = copy_of(checkpoint("interleaved", 2, "plain"), tmp_path)
    shutil.copy(path / "consolidated.01.pth", path / "consolidated.02.pth")
    match = "3 model-parallel shards do not divide size 256 of tensor tok_embeddings.weight"
    assert_open_fails(path, CheckpointError, match)


MOE_ARGS = TINY_META_PARAMS["moe_args"]
MISMATCHES = {  # params.json change -> (layout, the error it must give)
    "n_kv_heads": (
        "plain",
        {"n_kv_heads": 4},
        r"00\.pth: tensor layers\.0\.attention\.wk\.weight has shape \(32, 64\)"
        r".* implies \(64, 64\)",
    ),
    "ffn_dim_multiplier": (
        "fused",
        {"ffn_dim_multiplier": 1.5},
        r"00\.pth: tensor layers\.0\.feed_forward\.mlp\.fc1_weight has shape \(448, 64\)",
    ),
    "num_experts": (
        "fused",
        {"moe_args": {**MOE_ARGS, "num_experts": 8}},
        r"tensor layers\.1\.feed_forward\.router_DE has shape \(64, 4\)",
    ),
    "interleave_moe_layer_step": (
        "plain",
        {"moe_args": {**MOE_ARGS, "interleave_moe_layer_step": 1}},
        r"missing tensor layers\.0\.feed_forward\.router_DE",
    ),
}


@pytest.mark.parametrize(("layout", "change", "match"), MISMATCHES.values(), ids=MISMATCHES)
def test_params_json_that_does_not_match_the_tensors(
    checkpoint: MakeCheckpoint, tmp_path: Path, layout: str, change: dict[str, Any], match: str
) -> None:
    path = copy_of(checkpoint("interleaved", 1, layout), tmp_path)
    (path / "params.json").write_text(json.dumps({**TINY_META_PARAMS, **change}))
    assert_open_fails(path, CheckpointError, match)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_shard_file(checkpoint: MakeCheckpoint, tmp_path: Path, damage: str) -> None:
    path = copy_of(checkpoint("interleaved", 2, "fused"), tmp_path)
    shard = path / "consolidated.01.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint")
    assert_open_fails(path, CheckpointError, r"consolidated\.01\.pth: corrupt or truncated")


def test_unrecognised_tensor(tmp_path: Path) -> None:
    model, _ = reference("interleaved")
    extra = {"layers.0.attention.wq.bias": torch.zeros(64)}
    path = save_meta_checkpoint(model, TINY_META_PARAMS, tmp_path, extra=extra)
    with MetaCheckpoint(path) as ckpt:  # not read, not known to be unused: `check_source` refuses
        assert ckpt.unaccounted() == [
            f"{path / 'consolidated.00.pth'}: unrecognised tensor 'layers.0.attention.wq.bias'"
        ]
        assert "layers.0.attention.wq.bias" not in ckpt.unused_keys()


def test_missing_tensor_and_shards_that_disagree(
    checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    path = copy_of(checkpoint("interleaved", 2, "fused"), tmp_path)
    errors = {
        1: r"consolidated\.01\.pth: tensor names differ .*norm\.weight",
        0: r"consolidated\.00\.pth: missing tensor norm\.weight",
    }
    for rank, error in errors.items():
        shard = path / f"consolidated.{rank:02d}.pth"
        state = torch.load(shard, weights_only=True)
        del state["norm.weight"]
        torch.save(state, shard)
        assert_open_fails(path, CheckpointError, error)
