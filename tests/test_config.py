"""Llama4Config: presets, every HF key variant, round trips, validation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from l4jax.config import PRESETS, Llama4Config, RopeScaling, preset, rope_inv_freq
from l4jax.errors import ConfigError

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_round_trip(name):
    config = preset(name)
    assert Llama4Config.from_hf_dict(config.to_hf_dict()) == config


def test_scout_and_maverick_structure():
    scout, maverick = preset("scout"), preset("maverick")
    nope = [i for i in range(48) if not scout.rope_layers[i]]
    assert nope == list(range(3, 48, 4))
    assert scout.moe_layers == tuple(range(48))
    assert maverick.moe_layers == tuple(range(1, 48, 2))
    assert scout.chunked_layers == scout.rope_layers  # chunked exactly on RoPE layers
    assert scout.scan_period == maverick.scan_period == 4
    assert round(scout.num_params() / 1e9) == 108  # 109B published (counted with vision)
    assert int(maverick.num_params() / 1e9) == 400
    assert round(scout.num_params(active=True) / 1e9) == 17
    assert round(maverick.num_params(active=True) / 1e9) == 17


def test_published_scout_config_reads_as_the_scout_preset():
    config = Llama4Config.from_json_file(DATA / "scout_instruct_config.json")
    scout = preset("scout")
    assert config.rope_layers == scout.rope_layers  # empty no_rope_layers -> HF default
    assert config.chunked_layers == scout.chunked_layers
    assert config.moe_layers == scout.moe_layers
    assert config.rope_scaling == RopeScaling(16.0, 1.0, 1.0, 8192)
    assert config.attn_temperature_tuning is True  # hub writes 4
    assert config.eos_token_id == (200001, 200007, 200008)


def test_transformers_reads_what_we_write_and_agrees_on_layers():
    config = preset("maverick")
    hf = transformers.Llama4TextConfig(**config.to_hf_dict())
    assert hf.no_rope_layers == [int(r) for r in config.rope_layers]
    assert list(hf.moe_layers) == list(config.moe_layers)
    assert hf.layer_types == config.to_hf_dict()["layer_types"]


def test_rope_parameters_and_legacy_keys_agree():
    legacy = preset("tiny").to_hf_dict()
    modern = dict(legacy)
    del modern["rope_scaling"], modern["rope_theta"]
    modern["rope_parameters"] = dict(legacy["rope_scaling"], rope_theta=legacy["rope_theta"])
    assert Llama4Config.from_hf_dict(modern) == Llama4Config.from_hf_dict(legacy)


def test_layer_types_alone_define_rope_and_chunking():
    hf = preset("tiny").to_hf_dict()
    del hf["no_rope_layers"]
    hf["layer_types"] = [
        "full_attention",
        "chunked_attention",
        "chunked_attention",
        "full_attention",
    ]
    config = Llama4Config.from_hf_dict(hf)
    assert config.rope_layers == (False, True, True, False)
    assert config.chunked_layers == (False, True, True, False)


def test_irregular_layers_fall_back_to_one_group():
    hf = preset("tiny").to_hf_dict()
    hf["moe_layers"] = [0]
    config = Llama4Config.from_hf_dict(hf)
    assert config.scan_period == 4  # no repeating sub-pattern: one group of all layers
    assert config.layer_kinds[0].is_moe and not config.layer_kinds[1].is_moe


@pytest.mark.parametrize(
    "scaling",
    [RopeScaling(16.0, 1.0, 1.0, 8192), RopeScaling(8.0, 1.0, 4.0, 8192), None],
)
def test_rope_inv_freq_matches_transformers(scaling):
    fields = dict(hidden_size=5120, num_attention_heads=40, head_dim=128)
    if scaling is None:
        fields["rope_parameters"] = dict(rope_type="default", rope_theta=500000.0)
        hf_inv = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float) / 128))
    else:
        fields["rope_parameters"] = dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=scaling.factor,
            low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings,
        )
        hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](transformers.Llama4TextConfig(**fields))
    ours = rope_inv_freq(128, 500000.0, scaling)
    assert np.all(np.isfinite(ours))
    np.testing.assert_allclose(ours, hf_inv.numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_experts_per_tok=99), "num_experts_per_tok"),
        (dict(moe_layers=(7,)), "moe_layers"),
        (dict(rope_layers=(True,)), "rope_layers"),
        (dict(attention_chunk_size=None, chunked_layers=(True,) * 4), "attention_chunk_size"),
        (dict(moe_impl="magic"), "moe_impl"),
        (dict(dtype="int8"), "dtype"),
        (dict(remat_policy="some"), "remat_policy"),
    ],
)
def test_invalid_config_names_the_field(change, field):
    with pytest.raises(ConfigError, match=f"Llama4Config.{field}"):
        preset("tiny", **change)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_scaling.rope_type"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 2.0}), "low_freq_factor"),
        (dict(no_rope_layers=[1, 0]), "no_rope_layers"),
        (dict(layer_types=["sliding"] * 4), "layer_types"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(model_type="llama"), "model_type"),
    ],
)
def test_invalid_hf_config_names_the_key(change, field):
    hf = dict(preset("tiny").to_hf_dict(), **change)
    with pytest.raises(ConfigError, match=field):
        Llama4Config.from_hf_dict(hf)


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        Llama4Config.from_json_file(bad)
    with pytest.raises(ConfigError, match="missing.json: config file not found"):
        Llama4Config.from_json_file(tmp_path / "missing.json")


def test_to_json_file_writes_atomically(tmp_path):
    path = tmp_path / "config.json"
    preset("tiny").to_json_file(path)
    assert json.loads(path.read_text())["model_type"] == "llama4_text"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
