"""Tiny Hugging Face Llama 4 configs that the tests check l4jax against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from l4jax.torch_ref import build_hf_model, hf_logits, rel_err  # noqa: F401 (re-exported)

BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    intermediate_size_mlp=160,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=1,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    attn_temperature_tuning=True,
    attn_scale=0.1,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

# The configs vary the scalars (eps 1e-6 / 1e-3 / 3e-2, attn_scale 0.1 / 0.05 / 0.25): a
# hard-coded or ignored one (e.g. a qk-norm eps of 1e-6) moves the logits past the fp32
# tolerance in at least one config.
# all layers MoE, qk-norm, llama3 scaling with low == high (the 0/0 blend case)
SCOUT_LIKE = dict(
    BASE,
    rms_norm_eps=1e-6,
    num_hidden_layers=8,
    interleave_moe_layer_step=1,
    use_qk_norm=True,
    attention_chunk_size=16,
    floor_scale=16,
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=16.0,
        low_freq_factor=1.0,
        high_freq_factor=1.0,
        original_max_position_embeddings=32,
    ),
)
# MoE every 2nd layer (dense layers between), many experts, no qk-norm, no rope scaling
MAVERICK_LIKE = dict(
    BASE,
    rms_norm_eps=1e-3,
    attn_scale=0.05,
    num_hidden_layers=8,
    interleave_moe_layer_step=2,
    num_local_experts=16,
    use_qk_norm=False,
    attention_chunk_size=32,
    floor_scale=8,
    rope_parameters=dict(rope_type="default", rope_theta=10000.0),
)
# top-2 routing, blended llama3 scaling (low != high), chunk 8, temperature floor 24
TOP2_LIKE = dict(
    BASE,
    rms_norm_eps=3e-2,
    attn_scale=0.25,
    num_hidden_layers=4,
    num_experts_per_tok=2,
    num_local_experts=8,
    interleave_moe_layer_step=1,
    use_qk_norm=True,
    attention_chunk_size=8,
    floor_scale=24,
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=10000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    ),
)


def save_hf_model(model, path: Path, **kwargs: Any) -> Path:
    model.save_pretrained(path, **kwargs)
    return path
