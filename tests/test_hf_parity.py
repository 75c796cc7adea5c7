"""l4jax logits against Hugging Face transformers on random tiny checkpoints.

Every config runs 100 tokens: past several attention chunks (8-32) and temperature-tuning
floors (8-24), so chunk boundaries, NoPE layers and position handling are all exercised.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import MAVERICK_LIKE, SCOUT_LIKE, TOP2_LIKE, build_hf_model, hf_logits, rel_err
from safetensors.numpy import load_file, save_file

import l4jax
from l4jax.errors import CheckpointError

CONFIGS = {"scout_like": SCOUT_LIKE, "maverick_like": MAVERICK_LIKE, "top2_like": TOP2_LIKE}
TOKENS = np.random.default_rng(0).integers(0, 256, (2, 100))
FP32_TOL = 1e-5  # measured ~1e-6: what fp32 allows, so a wrong scalar (eps) shows


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
    model = build_hf_model(CONFIGS[request.param], seed=1)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path, hf_logits(model, TOKENS)


def _logits(model, params, tokens=TOKENS, **kwargs):
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens), **kwargs))


@pytest.mark.parametrize("impl", ["ragged_dot", "dense"])
def test_fp32_logits_match_transformers(reference, impl):
    path, ref = reference
    model, params = l4jax.from_pretrained(path, moe_impl=impl)
    assert rel_err(_logits(model, params), ref) < FP32_TOL


def _rms_err(got, ref):
    return float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref**2)))


def test_bf16_logits_within_documented_tolerance(reference):
    """bf16 params and compute: RMS error against the fp32 reference at most 1.5x that of
    transformers' own bf16 run (top-1 routing flips under bf16 in both, so the max error is
    dominated by a few re-routed tokens and is no useful bound)."""
    path, ref = reference
    model, params = l4jax.from_pretrained(path, dtype="bfloat16")
    assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
    got = _logits(model, params)
    assert got.dtype == np.float32
    hf_bf16 = build_hf_model(CONFIGS[path.name.rstrip("0123456789")], seed=1).to(torch.bfloat16)
    assert _rms_err(got, ref) < 1.5 * _rms_err(hf_logits(hf_bf16, TOKENS), ref)
    assert _rms_err(got, ref) < 0.1


@pytest.mark.parametrize(
    "break_it",
    [
        dict(chunked_layers=(True,) * 8),  # chunked attention on the NoPE layers too
        dict(attn_temperature_tuning=False),
        pytest.param(dict(rope_scaling=None), marks=pytest.mark.slow),
        pytest.param(dict(floor_scale=8192), marks=pytest.mark.slow),
    ],
)
def test_parity_check_detects_position_bugs(tmp_path, break_it):
    """The check above can fail: each classic porting mistake moves logits well past it."""
    model = build_hf_model(SCOUT_LIKE, seed=2)
    model.save_pretrained(tmp_path)
    ref = hf_logits(model, TOKENS)
    good, params = l4jax.from_pretrained(tmp_path)
    broken = l4jax.Llama4ForCausalLM(good.config.replace(**break_it))
    assert rel_err(_logits(good, params), ref) < FP32_TOL
    assert rel_err(_logits(broken, params), ref) > 100 * FP32_TOL


def test_sharded_checkpoint_with_index(tmp_path):
    model = build_hf_model(MAVERICK_LIKE, seed=3)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    jmodel, params = l4jax.from_pretrained(tmp_path)
    assert rel_err(_logits(jmodel, params), hf_logits(model, TOKENS)) < FP32_TOL


def test_multimodal_layout_loads_text_model(tmp_path):
    """`language_model.` prefixes and a `text_config`, vision tensors set aside."""
    model = build_hf_model(SCOUT_LIKE, seed=4)
    model.save_pretrained(tmp_path / "text")
    tensors = load_file(tmp_path / "text" / "model.safetensors")
    mm = {f"language_model.{k}": v for k, v in tensors.items()}
    mm["vision_model.patch_embedding.linear.weight"] = np.zeros((8, 4), np.float32)
    (tmp_path / "mm").mkdir()
    save_file(mm, tmp_path / "mm" / "model.safetensors")
    text_config = json.loads((tmp_path / "text" / "config.json").read_text())
    config = {"model_type": "llama4", "text_config": text_config, "vision_config": {}}
    (tmp_path / "mm" / "config.json").write_text(json.dumps(config))
    jmodel, params = l4jax.from_pretrained(tmp_path / "mm")
    assert rel_err(_logits(jmodel, params), hf_logits(model, TOKENS)) < FP32_TOL


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    build_hf_model(TOP2_LIKE, seed=5).save_pretrained(path)
    return path


def _rewrite(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"),
            "missing tensor 'model.layers.1.self_attn.k_proj.weight'",
        ),
        (lambda t: t.update(extra=np.zeros(3, np.float32)), "unexpected tensor 'extra'"),
        (
            lambda t: t.update({"model.norm.weight": np.zeros(7, np.float32)}),
            r"model.safetensors: tensor 'model.norm.weight' has shape \(7,\), "
            r"config expects \(64,\)",
        ),
    ],
)
def test_bad_tensors_are_named(good_checkpoint, tmp_path, edit, message):
    bad = _rewrite(good_checkpoint, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=message):
        l4jax.from_pretrained(bad)


def test_truncated_safetensors_is_named(good_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((good_checkpoint / "config.json").read_text())
    data = (good_checkpoint / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable safetensors"):
        l4jax.from_pretrained(bad)


def test_unknown_format_and_missing_path(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        l4jax.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no such file or directory"):
        l4jax.from_pretrained(tmp_path / "nope")
