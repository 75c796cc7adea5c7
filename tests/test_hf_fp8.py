"""Hugging Face FP8 checkpoints in the layout of Maverick's FP8 release load straight into fp8.

The fixture is built from the published layout (`l4jax/convert/hf_fp8.py`): compressed-tensors
"float-quantized" `quantization_config` with per-channel 8-bit float weights and an `ignore`
list of the modules kept in bf16, routed experts unfused per expert as float8_e4m3fn weights
with `weight_scale` [out, 1], names under `language_model.`. The last MoE layer's experts are
in the ignore list (stored unquantized, as Meta's fp8 recipe keeps the last layer): l4jax
quantizes those with its own fp8 recipe. The loaded model's logits equal those of the same
model with the dequantized weights (q * scale), and the float8 values are the stored ones.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from test_quantization import np_fp8

import l4jax
from l4jax.convert import convert_checkpoint
from l4jax.quantization import QArray

torch = pytest.importorskip("torch")

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 8)), jnp.int32)
LAYERS = 4  # Maverick-like: MoE on layers 1 and 3; layer 3's experts are ignored (bf16)
IGNORED_MOE_LAYER = 3


def quantization_config() -> dict:
    """As in the release's config.json: one config group (dynamic per-token fp8 activations,
    static per-channel fp8 weights) and the modules kept in bf16, named one by one."""
    ignore = ["lm_head"]
    for i in range(LAYERS):
        pre = f"language_model.model.layers.{i}."
        ignore += [pre + f"self_attn.{p}_proj" for p in "qkvo"]
        if i % 2:
            ignore += [pre + "feed_forward.router"]
            ignore += [pre + f"feed_forward.shared_expert.{p}_proj" for p in ("gate", "up", "down")]
        else:
            ignore += [pre + f"feed_forward.{p}_proj" for p in ("gate", "up", "down")]
    ignore += [
        f"language_model.model.layers.{IGNORED_MOE_LAYER}.feed_forward.experts.{e}.{p}_proj"
        for e in range(16)
        for p in ("gate", "up", "down")
    ]
    float8 = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {**float8, "strategy": "channel", "dynamic": False},
                "input_activations": {**float8, "strategy": "token", "dynamic": True},
                "output_activations": None,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def fp8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A Linear weight [out, in] as compressed-tensors stores it: float8_e4m3fn values and one
    bf16 scale per output channel (max|w| / 448)."""
    scale = (np.abs(w).max(axis=1, keepdims=True) / 448).astype(ml_dtypes.bfloat16)
    q = np.clip(w / scale.astype(np.float32), -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(the FP8 checkpoint, the bf16 original's params with every stored float8 expert replaced
    by its dequantized weights: the reference)."""
    from hf_reference import MAVERICK_LIKE, build_hf_model
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("fp8")
    build_hf_model(dict(MAVERICK_LIKE, num_hidden_layers=LAYERS), seed=0).save_pretrained(
        root / "orig"
    )
    from safetensors.numpy import load_file

    original = load_file(root / "orig" / "model.safetensors")
    shutil.copytree(root / "orig", root / "deq")
    tensors, reference = {}, {}
    for key, w in original.items():
        reference[key] = w
        if not key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors["language_model." + key] = torch.from_numpy(w.copy())
            continue
        layer = int(key.split(".")[2])
        f = w.shape[-1] // 2
        projs = {"down": w} if key.endswith("down_proj") else {"gate": w[..., :f], "up": w[..., f:]}
        deq = {}
        for name, stacked in projs.items():  # [E, in, out]
            experts = []
            for e in range(stacked.shape[0]):
                pre = f"language_model.{key.rsplit('.', 1)[0]}.{e}.{name}_proj."
                linear = np.ascontiguousarray(stacked[e].T)  # [out, in]
                if layer == IGNORED_MOE_LAYER:
                    tensors[pre + "weight"] = torch.from_numpy(linear)
                    experts.append(stacked[e])
                    continue
                q, scale = fp8_per_channel(linear)
                tensors[pre + "weight"] = torch.from_numpy(q.view(np.uint8)).view(
                    torch.float8_e4m3fn
                )
                tensors[pre + "weight_scale"] = torch.from_numpy(scale.view(np.uint16)).view(
                    torch.bfloat16
                )
                experts.append((q.astype(np.float32) * scale.astype(np.float32)).T)
            deq[name] = np.stack(experts)
            if layer == IGNORED_MOE_LAYER:  # what l4jax's fp8 recipe makes of them
                deq[name] = np_fp8(deq[name], (1,))
        reference[key] = np.concatenate(list(deq.values()), axis=-1)
    path = root / "Llama-4-Maverick-FP8-like"
    path.mkdir()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((root / "orig" / "config.json").read_text())
    config["quantization_config"] = quantization_config()
    (path / "config.json").write_text(json.dumps(config))
    save_file(
        {k: torch.from_numpy(v.copy()) for k, v in reference.items()},
        root / "deq" / "model.safetensors",
    )
    return path, root / "deq"


def test_fp8_checkpoint_loads_into_fp8_params_as_stored(checkpoints):
    path, dequantized = checkpoints
    # (the dense MoE backend compiles fastest; the backends agree, tests/test_quantization.py)
    model, params = l4jax.from_pretrained(path, dtype="float32", moe_impl="dense")
    gate = params["layers"]["layer_1"]["feed_forward"]["gate_proj"]  # (scan period 4: layer 1)
    assert isinstance(gate, QArray) and gate.qvalue.dtype == jnp.float8_e4m3fn
    assert gate.scale.shape == (1, 16, 1, gate.shape[-1])
    ignored = params["layers"]["layer_3"]["feed_forward"]["down_proj"]  # stored bf16: quantized
    assert isinstance(ignored, QArray) and ignored.qvalue.dtype == jnp.float8_e4m3fn
    # layer 1 (scan group 0): the stored float8 bits and scales, transposed to [in, out]
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        key = "language_model.model.layers.1.feed_forward.experts.5.gate_proj."
        stored_q = f.get_tensor(key + "weight").view(torch.uint8).numpy()
        stored_scale = f.get_tensor(key + "weight_scale").float().numpy()
    np.testing.assert_array_equal(np.asarray(gate.qvalue[0, 5]).view(np.uint8), stored_q.T)
    np.testing.assert_array_equal(np.asarray(gate.scale[0, 5]), stored_scale.T)
    # attention and the shared expert stay dense (in the ignore list)
    assert not isinstance(params["layers"]["layer_1"]["self_attn"]["q_proj"], QArray)
    assert not isinstance(
        params["layers"]["layer_1"]["feed_forward"]["shared_expert"]["gate_proj"], QArray
    )
    # logits: those of the model with the dequantized weights (layer 3's bf16 experts: their
    # round trip through l4jax's fp8 recipe, numpy's fbgemm formula on the reference side)
    _, ref_params = l4jax.from_pretrained(dequantized, dtype="float32")
    for name in ("gate_proj", "up_proj", "down_proj"):
        got = params["layers"]["layer_1"]["feed_forward"][name].astype(jnp.float32)
        want = ref_params["layers"]["layer_1"]["feed_forward"][name]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
    apply = jax.jit(model.apply)
    want = apply({"params": ref_params}, TOKENS)
    np.testing.assert_allclose(apply({"params": params}, TOKENS), want, rtol=1e-5, atol=1e-5)


def test_fp8_checkpoint_other_modes_and_conversion_are_refused(checkpoints, tmp_path):
    path, _ = checkpoints
    with pytest.raises(l4jax.errors.ConfigError, match="loads as quantize='fp8', not 'int4'"):
        l4jax.from_pretrained(path, quantize="int4")
    with pytest.raises(l4jax.errors.CheckpointError, match="FP8 .*from_pretrained"):
        convert_checkpoint(path, tmp_path / "out")


def test_unsupported_quantization_config_is_refused_by_name(checkpoints, tmp_path):
    path, _ = checkpoints
    bad = tmp_path / "int4-packed"
    shutil.copytree(path, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["format"] = "pack-quantized"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        l4jax.errors.CheckpointError,
        match=r"config.json: quantization_config \(quant_method 'compressed-tensors', "
        r"format 'pack-quantized'\) is not supported",
    ):
        l4jax.from_pretrained(bad)
