"""Random tiny models of Meta's reference Llama 4 (llama_models 0.3.0) and their checkpoints.

`build_meta_model` runs `llama_models.llama4.model.Transformer` on CPU in float32 (a 1-process
gloo group, fairscale model parallel size 1); `save_meta_checkpoint` writes it as Meta ships
checkpoints (params.json + consolidated.NN.pth), split into model-parallel shards the way
`llama_models/checkpoint.py` merges them back, in the plain or the fused key layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import torch
from llama_models.llama4.model import Transformer

from l4jax import torch_ref
from l4jax.torch_ref import meta_logits  # noqa: F401 (re-exported)

torch.set_num_threads(2)

# dense and MoE layers interleaved, qk-norm, chunked attention and temperature tuning that both
# change inside 48 tokens; llama3 rope scaling with all three frequency bands of head_dim 16:
# high_freq_factor 64 blends wavelengths 128..8192, so the scaling shows within 48 tokens
TINY_META_PARAMS: dict[str, Any] = {
    "dim": 64,
    "n_layers": 4,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 256,
    "multiple_of": 16,
    "ffn_dim_multiplier": 1.3,
    "ffn_exp": 4.0,
    "norm_eps": 3e-2,  # (qk-norm: a wrong eps shows at fp32 tolerance)
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
    "rope_scaling_factor": 8.0,
    "rope_high_freq_factor": 64.0,
    "nope_layer_interval": 4,
    "use_qk_norm": True,
    "attention_chunk_size": 16,
    "attn_temperature_tuning": True,
    "floor_scale": 16.0,
    "attn_scale": 0.1,
    "moe_args": {
        "num_experts": 4,
        "capacity_factor": 1.0,
        "auto_scale_F": True,
        "top_k": 1,
        "interleave_moe_layer_step": 2,
    },
}

# every layer MoE, top-2 routing, no qk-norm, no chunking, no rope scaling, NoPE every 2nd layer
TINY_META_PARAMS_ALL_MOE: dict[str, Any] = {
    "dim": 64,
    "n_layers": 4,
    "n_heads": 8,
    "n_kv_heads": 2,
    "vocab_size": 256,
    "multiple_of": 32,
    "ffn_dim_multiplier": 1.0,
    "ffn_exp": 2.0,
    "norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "nope_layer_interval": 2,
    "use_qk_norm": False,
    "attn_temperature_tuning": True,
    "floor_scale": 8.0,
    "attn_scale": 0.2,
    "moe_args": {
        "num_experts": 4,
        "capacity_factor": 1.0,
        "auto_scale_F": False,
        "top_k": 2,
        "interleave_moe_layer_step": 1,
    },
}

Layout = Literal["plain", "fused"]

# plain Meta key -> model-parallel split axis (fairscale Column/RowParallelLinear, MoE Experts);
# tensors matching none (norms, router_DE) are replicated in every shard
_SHARD_AXES = (
    (re.compile(r"(tok_embeddings|output)\.weight"), 0),
    (re.compile(r"layers\.\d+\.attention\.w[qkv]\.weight"), 0),
    (re.compile(r"layers\.\d+\.attention\.wo\.weight"), 1),
    (re.compile(r"layers\.\d+\.feed_forward\.(shared_expert\.)?w[13]\.weight"), 0),
    (re.compile(r"layers\.\d+\.feed_forward\.(shared_expert\.)?w2\.weight"), 1),
    (re.compile(r"layers\.\d+\.feed_forward\.experts\.w[13]"), 2),
    (re.compile(r"layers\.\d+\.feed_forward\.experts\.w2"), 1),
    # vision tower and projector (llama_models/checkpoint.py `_WEIGHT_{COLUMN,ROW}_KEY`)
    (re.compile(r"vision_embeddings\.vision_encoder\.conv1\._linear\.weight"), 0),
    (re.compile(r"vision_embeddings\..*\.attn\.w[qkv]\.(weight|bias)"), 0),
    (re.compile(r"vision_embeddings\..*\.attn\.wo\.weight"), 1),
    (re.compile(r"vision_embeddings\..*\.mlp\.c_fc\.(weight|bias)"), 0),
    (re.compile(r"vision_embeddings\..*\.mlp\.c_proj\.weight"), 1),
    (re.compile(r"vision_projection\.weight"), 0),
)


def build_meta_model(
    params: dict[str, Any], seed: int, max_seq_len: int = 64, max_batch_size: int = 2
) -> Transformer:
    """Meta's reference Transformer for `params` (a params.json dict), random float32 weights."""
    model = torch_ref.build_meta_model(params, max_seq_len, max_batch_size)
    _randomize(model, seed)
    return model


def save_meta_checkpoint(
    model: Transformer,
    params: dict[str, Any],
    path: str | Path,
    n_shards: int = 1,
    layout: Layout = "plain",
    dtype: torch.dtype | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write params.json and consolidated.NN.pth; `extra` entries go into every shard as is."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params, indent=2))
    state = {k: v.detach().to(dtype or v.dtype) for k, v in model.state_dict().items()}
    for rank in range(n_shards):
        shard = {key: _shard_of(key, value, rank, n_shards) for key, value in state.items()}
        if layout == "fused":
            shard = _fused(shard)
        torch.save({**shard, **(extra or {})}, path / f"consolidated.{rank:02d}.pth")
    return path


def _randomize(model: Transformer, seed: int) -> None:
    """Every parameter random: norms ~1, embeddings ~N(0, 1), routers decisive (std 0.5),
    projections std fan_in^-0.5 (fan_in = axis 1 of the [E, in, out] expert weights)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name == "tok_embeddings.weight":
                p.normal_(0.0, 1.0)
            elif name.endswith("router_DE"):
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, p.shape[1 if p.ndim == 3 else -1] ** -0.5)


def _shard_of(key: str, value: torch.Tensor, rank: int, n_shards: int) -> torch.Tensor:
    """Model-parallel rank `rank`'s part of plain tensor `key` (all of it if replicated)."""
    axis = next((a for pattern, a in _SHARD_AXES if pattern.fullmatch(key)), None)
    if axis is None or n_shards == 1:
        return value.clone()
    return value.chunk(n_shards, dim=axis)[rank].clone(memory_format=torch.contiguous_format)


def _fused(shard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One shard's plain keys rewritten in the fused layout the model.py / moe.py / ffn.py
    load hooks accept: wqkv, layer_norm_weight, mlp.fc1/fc2_weight, moe_w_*, w_*_shared."""
    out = dict(shard)
    layers = sorted({m[1] for k in shard if (m := re.match(r"(layers\.\d+\.)", k))})
    for p in layers:
        qkv = [out.pop(f"{p}attention.w{x}.weight") for x in "qkv"]
        out[f"{p}attention.wqkv.weight"] = torch.cat(qkv)
        out[f"{p}attention.wqkv.layer_norm_weight"] = out.pop(f"{p}attention_norm.weight")
        ffn = f"{p}feed_forward."
        if f"{ffn}router_DE" in out:
            out[f"{ffn}norm.weight"] = out.pop(f"{p}ffn_norm.weight")
            for plain, flat in (("w1", "moe_w_in_eD_F"), ("w3", "moe_w_swiglu_eD_F")):
                w = out.pop(f"{ffn}experts.{plain}")  # [E, D, F/n]
                out[f"{ffn}experts.{flat}"] = w.reshape(-1, w.shape[-1])
            w2 = out.pop(f"{ffn}experts.w2")  # [E, F/n, D]
            out[f"{ffn}experts.moe_w_out_eF_D"] = w2.reshape(-1, w2.shape[-1])
            for plain, fused in (
                ("w1", "w_in_shared_FD"),
                ("w3", "w_swiglu_FD"),
                ("w2", "w_out_shared_DF"),
            ):
                out[f"{ffn}{fused}.weight"] = out.pop(f"{ffn}shared_expert.{plain}.weight")
        else:
            out[f"{ffn}mlp.layer_norm_weight"] = out.pop(f"{p}ffn_norm.weight")
            w13 = [out.pop(f"{ffn}w1.weight"), out.pop(f"{ffn}w3.weight")]
            out[f"{ffn}mlp.fc1_weight"] = torch.cat(w13)
            out[f"{ffn}mlp.fc2_weight"] = out.pop(f"{ffn}w2.weight")
    return out
