"""Meta's original Llama 4 checkpoints: `params.json` + `consolidated.NN.pth`, read lazily.

`MetaCheckpoint` presents the text model tensor by tensor under Hugging Face names and layouts
(the tensor source `l4jax.convert` consumes). Each shard file is memory-mapped once
(`torch.load(mmap=True, weights_only=True)`); `get` touches only the tensors it needs.

Facts this mapping relies on (llama_models 0.3.0 `llama4/`, transformers' llama4 converter):
- wq/wk rows are NOT permuted: both references use interleaved (complex-pair) RoPE.
- Model-parallel shards split ColumnParallelLinear weights (wq, wk, wv, w1, w3, tok_embeddings,
  output) on dim 0, RowParallelLinear weights (wo, w2) on dim 1, routed experts on their hidden
  axis F, and replicate norms and router_DE (`llama_models/checkpoint.py`, `reshard_mp`).
- Fused layouts, per shard: `wqkv` = [q; k; v] rows, `mlp.fc1_weight` = [w1; w3] rows, the
  flattened experts `moe_w_in_eD_F` / `moe_w_swiglu_eD_F` = [E*D, F/n] and `moe_w_out_eF_D` =
  [E*F/n, D] (unflattened per shard before concatenating, as `convert_moe_weights` does).
- `MetaCheckpoint(path, vision=True)` also presents the vision tower and projector
  (`vision_embeddings.*`, `vision_projection.weight`) under the names of HF's
  `Llama4ForConditionalGeneration`, the text model under `language_model.`; their shards split
  conv1, wq/wk/wv (+ biases), c_fc (+ bias) and vision_projection on dim 0, wo and c_proj on
  dim 1, and replicate the rest.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import ml_dtypes
import numpy as np
import torch

from l4jax.convert.mapping import TEXT_PREFIX
from l4jax.errors import CheckpointError, read_json_object


class CheckpointFileNotFoundError(CheckpointError, FileNotFoundError):
    """params.json or the consolidated.NN.pth shard files are missing."""


SHARD_FILE = re.compile(r"consolidated\.(\d+)\.pth")
# Meta tensors with no text-model counterpart: the vision tower and projector, the RoPE cache,
# quantisation state and routing statistics. Listed by `unused_keys()`.
UNUSED_KEY = re.compile(
    r"vision_embeddings\..*|vision_projection\..*|rope\.freqs|freq_cis"
    r"|.*\._extra_state|.*gate_stats_3E|.*expert_activation_DE"
)
# Meta tensors of the vision tower and projector (read by `MetaCheckpoint(path, vision=True)`)
VISION_KEY = re.compile(r"vision_embeddings\..*|vision_projection\..*")
# Meta's vision encoder: theta hard-coded in VisionEncoder.get_rope_freqs, 3 input channels
META_VISION_ROPE_THETA = 10000.0
META_VISION_CHANNELS = 3
# the `<|patch|>`, `<|image_start|>`, `<|image_end|>` ids of Meta's tokenizer
META_IMAGE_TOKEN_IDS = {
    "image_token_index": 200092,
    "boi_token_index": 200080,
    "eoi_token_index": 200081,
}
# Meta's llama3 RoPE scaling constants (`apply_scaling` in llama_models/llama4/model.py)
META_ROPE_LOW_FREQ_FACTOR = 1.0
META_ROPE_ORIGINAL_CONTEXT = 8192
# `vocab_size` -1 in params.json: llama_models' generation.py takes the tokenizer's size
META_TOKENIZER_WORDS = 202048
REMAP_BYTES = 2**30  # StreamingMeta re-maps the shards after this much data was read from them

_NUMPY_DTYPES = {
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
}


# ---- params.json -> HF config ---------------------------------------------------------------


def hf_config_from_params(params: dict[str, Any]) -> dict[str, Any]:
    """The HF `llama4_text` config dict for a Meta `params.json` (ModelArgs defaults and shape
    rules of llama_models 0.3.0: args.py, model.py TransformerBlock, moe.py MoE)."""
    dim, n_layers, n_heads = (_required(params, k) for k in ("dim", "n_layers", "n_heads"))
    if dim % n_heads:
        raise CheckpointError(f"params.json: dim {dim} is not divisible by n_heads {n_heads}")
    moe = params.get("moe_args")
    if moe is not None and (not isinstance(moe, dict) or moe.get("num_experts", -1) <= 0):
        raise CheckpointError(f"params.json: moe_args needs a positive num_experts, got {moe!r}")
    step = moe.get("interleave_moe_layer_step", 1) if moe else 0
    nope = params.get("nope_layer_interval")
    uses_rope = [int(nope is None or (i + 1) % nope != 0) for i in range(n_layers)]
    chunk = params.get("attention_chunk_size")
    floor_scale = float(params.get("floor_scale", 8192.0))
    ffn_dense = _dense_hidden(params)
    vocab = params.get("vocab_size", -1)
    return {
        "model_type": "llama4_text",
        "vocab_size": vocab if vocab > 0 else META_TOKENIZER_WORDS,
        "hidden_size": dim,
        "intermediate_size": _expert_hidden(params, moe) if moe else ffn_dense,
        "intermediate_size_mlp": ffn_dense,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": params.get("n_kv_heads") or n_heads,
        "head_dim": dim // n_heads,  # Meta's Attention ignores params' head_dim
        "num_local_experts": moe["num_experts"] if moe else 0,
        "num_experts_per_tok": moe.get("top_k", 1) if moe else 1,
        "interleave_moe_layer_step": step,
        "moe_layers": [i for i in range(n_layers) if step and (i + 1) % step == 0],
        "no_rope_layers": uses_rope,  # HF: 1 = the layer uses RoPE
        "layer_types": [
            "chunked_attention" if rope and chunk is not None else "full_attention"
            for rope in uses_rope
        ],
        "attention_chunk_size": chunk,
        "rope_theta": float(params.get("rope_theta", 500000.0)),
        "rope_scaling": _rope_scaling(params),
        "use_qk_norm": bool(params.get("use_qk_norm", False)),
        "attn_temperature_tuning": bool(params.get("attn_temperature_tuning", False)),
        "floor_scale": int(floor_scale) if floor_scale.is_integer() else floor_scale,
        "attn_scale": float(params.get("attn_scale", 0.1)),
        "rms_norm_eps": float(params.get("norm_eps", 1e-5)),
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
    }


def _required(params: dict[str, Any], name: str) -> int:
    value = params.get(name, -1)
    if not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"params.json: {name!r} must be a positive integer, got {value!r}")
    return value


def _dense_hidden(params: dict[str, Any]) -> int:
    """Dense SwiGLU hidden size: TransformerBlock's rule in llama_models/llama4/model.py."""
    multiple_of = params.get("multiple_of", 256)
    hidden = int(2 * int(4 * params["dim"]) / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _expert_hidden(params: dict[str, Any], moe: dict[str, Any]) -> int:
    """Routed and shared expert hidden size F: MoE.__init__ in llama_models/llama4/moe.py."""
    if params.get("ffn_exp") is None or params.get("ffn_dim_multiplier") is None:
        raise CheckpointError("params.json: moe_args needs 'ffn_exp' and 'ffn_dim_multiplier'")
    hidden = int(2 * int(params["ffn_exp"] * params["dim"]) / 3)
    hidden = int(params["ffn_dim_multiplier"] * hidden)
    if moe.get("auto_scale_F", True):
        hidden = int(hidden / (moe.get("capacity_factor", 1.0) + 1))
    return hidden + -hidden % params.get("multiple_of", 256)


def _rope_scaling(params: dict[str, Any]) -> dict[str, Any] | None:
    """llama3 scaling as Meta applies it (ModelArgs' defaults factor 16, high_freq_factor 1)."""
    if not params.get("use_scaled_rope", False):
        return None
    factor = params.get("rope_scaling_factor")
    high = params.get("rope_high_freq_factor")
    return {
        "rope_type": "llama3",
        "factor": float(16 if factor is None else factor),
        "low_freq_factor": META_ROPE_LOW_FREQ_FACTOR,
        "high_freq_factor": float(1 if high is None else high),
        "original_max_position_embeddings": META_ROPE_ORIGINAL_CONTEXT,
    }


def hf_vision_config_from_args(args: Any) -> dict[str, Any]:
    """The HF `vision_config` dict for params.json's `vision_args` (llama_models 0.3.0
    `VisionArgs`, vision/embedding.py and vision/encoder.py)."""
    if not isinstance(args, dict):
        raise CheckpointError(f"params.json: vision_args must be an object, got {args!r}")
    try:
        sizes = {}
        for name in ("image_size", "patch_size"):
            size = args[name]
            if size["height"] != size["width"]:
                raise CheckpointError(f"params.json: vision_args.{name} must be square, got {size}")
            sizes[name] = int(size["height"])
        dim, ratio, out = int(args["dim"]), float(args["pixel_shuffle_ratio"]), args["output_dim"]
        return {
            "model_type": "llama4_vision_model",
            "hidden_size": dim,
            "intermediate_size": int(args["mlp_ratio"] * dim),  # _TransformerBlock's MLP
            "num_hidden_layers": int(args["n_layers"]),
            "num_attention_heads": int(args["n_heads"]),
            "num_channels": META_VISION_CHANNELS,
            **sizes,
            "pixel_shuffle_ratio": ratio,
            "projector_input_dim": int(out),
            "projector_output_dim": int(out),
            "vision_output_dim": int(out),
            "rope_parameters": {"rope_type": "default", "rope_theta": META_VISION_ROPE_THETA},
            "hidden_act": "gelu",
            "norm_eps": 1e-5,
        }
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"params.json: vision_args is missing or has a bad {e}") from None


# ---- HF tensor recipes ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slab:
    """One Meta tensor's share of an HF tensor.

    Every shard file holds `key` with shape `stored`. A shard's piece is its `rows` (fused tensors)
    reshaped to `view` (flattened experts); pieces are concatenated along `shard_dim`, or read
    from shard 0 alone when `shard_dim` is None (replicated tensors).
    """

    key: str
    stored: tuple[int, ...]
    shard_dim: int | None
    rows: tuple[int, int] | None = None
    view: tuple[int, ...] | None = None

    def merged_shape(self, n_shards: int) -> tuple[int, ...]:
        shape = list(self.view or self.stored)
        if self.rows is not None and self.view is None:
            shape[0] = self.rows[1] - self.rows[0]
        if self.shard_dim is not None:
            shape[self.shard_dim] *= n_shards
        return tuple(shape)


@dataclass(frozen=True)
class _Recipe:
    """An HF tensor: its slabs concatenated along the last axis, then transposed if asked."""

    slabs: tuple[_Slab, ...]
    transpose: bool = False


@dataclass(frozen=True)
class _Dims:
    """The sizes recipes need, from the HF config, and the shard count `n`."""

    where: Path
    n: int
    dim: int
    vocab: int
    q: int  # n_heads * head_dim
    kv: int  # n_kv_heads * head_dim
    ffn_dense: int
    ffn_expert: int
    experts: int

    def split(self, size: int, key: str) -> int:
        """Per-shard extent of an axis of `size` of tensor `key`."""
        if size % self.n:
            raise CheckpointError(
                f"{self.where}: {self.n} model-parallel shards do not divide size {size} "
                f"of tensor {key}"
            )
        return size // self.n

    def column(self, key: str, rows: int) -> _Slab:
        """A ColumnParallelLinear weight [rows, dim], split on rows."""
        return _Slab(key, (self.split(rows, key), self.dim), 0)

    def row(self, key: str, cols: int) -> _Slab:
        """A RowParallelLinear weight [dim, cols], split on cols."""
        return _Slab(key, (self.dim, self.split(cols, key)), 1)


# HF layer norm -> its Meta names: plain, then the fused layouts' (model.py load hooks)
_NORMS = {
    "input_layernorm": ("attention_norm.weight", "attention.wqkv.layer_norm_weight"),
    "post_attention_layernorm": (
        "ffn_norm.weight",
        "feed_forward.norm.weight",
        "feed_forward.mlp.layer_norm_weight",
    ),
}


def _recipes(config: dict[str, Any], d: _Dims, names: set[str]) -> dict[str, _Recipe]:
    """HF name -> recipe for every text tensor; `names` are shard 0's keys (picks the layout)."""
    recipes = {"model.embed_tokens.weight": _Recipe((d.column("tok_embeddings.weight", d.vocab),))}
    for i in range(config["num_hidden_layers"]):
        meta, hf = f"layers.{i}.", f"model.layers.{i}."
        recipes.update(_attention(meta, hf, d, names))
        moe = i in config["moe_layers"]
        recipes.update(_experts(meta, hf, d, names) if moe else _dense(meta, hf, d, names))
        for hf_norm, choices in _NORMS.items():
            key = _first_present(names, [meta + c for c in choices])
            recipes[f"{hf}{hf_norm}.weight"] = _Recipe((_Slab(key, (d.dim,), None),))
    recipes["model.norm.weight"] = _Recipe((_Slab("norm.weight", (d.dim,), None),))
    recipes["lm_head.weight"] = _Recipe((d.column("output.weight", d.vocab),))
    return recipes


def _first_present(names: set[str], keys: list[str]) -> str:
    """The first of `keys` in the checkpoint (or the first, to be reported missing)."""
    return next((k for k in keys if k in names), keys[0])


def _attention(meta: str, hf: str, d: _Dims, names: set[str]) -> dict[str, _Recipe]:
    """q/k/v/o projections from wq/wk/wv/wo or from the fused wqkv (rows [q; k; v] per shard)."""
    fused = f"{meta}attention.wqkv.weight"
    if fused in names:
        q, kv = d.split(d.q, fused), d.split(d.kv, fused)
        stored = (q + 2 * kv, d.dim)
        bounds = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
        slabs = {x: _Slab(fused, stored, 0, rows=b) for x, b in bounds.items()}
    else:
        sizes = {"q": d.q, "k": d.kv, "v": d.kv}
        slabs = {x: d.column(f"{meta}attention.w{x}.weight", n) for x, n in sizes.items()}
    slabs["o"] = d.row(f"{meta}attention.wo.weight", d.q)
    return {f"{hf}self_attn.{x}_proj.weight": _Recipe((s,)) for x, s in slabs.items()}


def _dense(meta: str, hf: str, d: _Dims, names: set[str]) -> dict[str, _Recipe]:
    """Dense SwiGLU from w1/w3/w2 or from mlp.fc1_weight (rows [w1; w3] per shard)/fc2_weight."""
    ffn = f"{meta}feed_forward."
    fc1 = f"{ffn}mlp.fc1_weight"
    if fc1 in names:
        f = d.split(d.ffn_dense, fc1)
        gate = _Slab(fc1, (2 * f, d.dim), 0, rows=(0, f))
        up = _Slab(fc1, (2 * f, d.dim), 0, rows=(f, 2 * f))
        down = d.row(f"{ffn}mlp.fc2_weight", d.ffn_dense)
    else:
        gate = d.column(f"{ffn}w1.weight", d.ffn_dense)
        up = d.column(f"{ffn}w3.weight", d.ffn_dense)
        down = d.row(f"{ffn}w2.weight", d.ffn_dense)
    slabs = {"gate": gate, "up": up, "down": down}
    return {f"{hf}feed_forward.{x}_proj.weight": _Recipe((s,)) for x, s in slabs.items()}


def _experts(meta: str, hf: str, d: _Dims, names: set[str]) -> dict[str, _Recipe]:
    """Router [D, E] -> [E, D]; experts w1/w3 [E, D, F] -> gate_up_proj [E, D, 2F] (gate first),
    w2 [E, F, D] -> down_proj; the shared expert from shared_expert.w* or w_*_shared."""
    ffn = f"{meta}feed_forward."
    e, dim = d.experts, d.dim
    if f"{ffn}experts.moe_w_in_eD_F" in names:
        f = d.split(d.ffn_expert, f"{ffn}experts.moe_w_in_eD_F")
        gate, up, down = (
            _Slab(f"{ffn}experts.{name}", stored, axis, view=view)
            for name, stored, axis, view in (
                ("moe_w_in_eD_F", (e * dim, f), 2, (e, dim, f)),
                ("moe_w_swiglu_eD_F", (e * dim, f), 2, (e, dim, f)),
                ("moe_w_out_eF_D", (e * f, dim), 1, (e, f, dim)),
            )
        )
        shared = ("w_in_shared_FD", "w_swiglu_FD", "w_out_shared_DF")
    else:
        f = d.split(d.ffn_expert, f"{ffn}experts.w1")
        gate = _Slab(f"{ffn}experts.w1", (e, dim, f), 2)
        up = _Slab(f"{ffn}experts.w3", (e, dim, f), 2)
        down = _Slab(f"{ffn}experts.w2", (e, f, dim), 1)
        shared = ("shared_expert.w1", "shared_expert.w3", "shared_expert.w2")
    shared_keys = [f"{ffn}{name}.weight" for name in shared]
    out = f"{hf}feed_forward."
    return {
        f"{out}router.weight": _Recipe((_Slab(f"{ffn}router_DE", (dim, e), None),), transpose=True),
        f"{out}experts.gate_up_proj": _Recipe((gate, up)),
        f"{out}experts.down_proj": _Recipe((down,)),
        f"{out}shared_expert.gate_proj.weight": _Recipe((d.column(shared_keys[0], d.ffn_expert),)),
        f"{out}shared_expert.up_proj.weight": _Recipe((d.column(shared_keys[1], d.ffn_expert),)),
        f"{out}shared_expert.down_proj.weight": _Recipe((d.row(shared_keys[2], d.ffn_expert),)),
    }


def _vision_recipes(vision: dict[str, Any], d: _Dims) -> dict[str, _Recipe]:
    """HF name -> recipe for the vision tower and projector. Column-parallel weights (and their
    biases) are split on dim 0, row-parallel ones (wo, c_proj) on dim 1; norms, embeddings and
    row-parallel biases are replicated (`_WEIGHT_*_KEY` in llama_models/checkpoint.py)."""
    dv, f = vision["hidden_size"], vision["intermediate_size"]
    out, ratio = vision["projector_output_dim"], vision["pixel_shuffle_ratio"]
    grid = vision["image_size"] // vision["patch_size"]
    patch = META_VISION_CHANNELS * vision["patch_size"] ** 2
    shuffled = int(dv // ratio**2)

    def column(key: str, rows: int, cols: int | None = None) -> _Recipe:
        shape = (d.split(rows, key),) if cols is None else (d.split(rows, key), cols)
        return _Recipe((_Slab(key, shape, 0),))

    def row(key: str, rows: int, cols: int) -> _Recipe:
        return _Recipe((_Slab(key, (rows, d.split(cols, key)), 1),))

    def same(key: str, *shape: int) -> _Recipe:
        return _Recipe((_Slab(key, shape, None),))

    enc, hf = "vision_embeddings.vision_encoder.", "vision_model."
    recipes = {
        f"{hf}patch_embedding.linear.weight": column(f"{enc}conv1._linear.weight", dv, patch),
        f"{hf}class_embedding": same(f"{enc}class_embedding", dv),
        f"{hf}positional_embedding_vlm": same(f"{enc}positional_embedding_vlm", grid**2 + 1, dv),
    }
    for meta_norm, hf_norm in (("ln_pre", "layernorm_pre"), ("ln_post", "layernorm_post")):
        for p in ("weight", "bias"):
            recipes[f"{hf}{hf_norm}.{p}"] = same(f"{enc}{meta_norm}.{p}", dv)
    for i in range(vision["num_hidden_layers"]):
        meta, hfl = f"{enc}transformer.resblocks.{i}.", f"{hf}model.layers.{i}."
        for x in "qkv":
            recipes[f"{hfl}self_attn.{x}_proj.weight"] = column(f"{meta}attn.w{x}.weight", dv, dv)
            recipes[f"{hfl}self_attn.{x}_proj.bias"] = column(f"{meta}attn.w{x}.bias", dv)
        recipes[f"{hfl}self_attn.o_proj.weight"] = row(f"{meta}attn.wo.weight", dv, dv)
        recipes[f"{hfl}self_attn.o_proj.bias"] = same(f"{meta}attn.wo.bias", dv)
        recipes[f"{hfl}mlp.fc1.weight"] = column(f"{meta}mlp.c_fc.weight", f, dv)
        recipes[f"{hfl}mlp.fc1.bias"] = column(f"{meta}mlp.c_fc.bias", f)
        recipes[f"{hfl}mlp.fc2.weight"] = row(f"{meta}mlp.c_proj.weight", dv, f)
        recipes[f"{hfl}mlp.fc2.bias"] = same(f"{meta}mlp.c_proj.bias", dv)
        for meta_norm, hf_norm in (
            ("ln_1", "input_layernorm"),
            ("ln_2", "post_attention_layernorm"),
        ):
            for p in ("weight", "bias"):
                recipes[f"{hfl}{hf_norm}.{p}"] = same(f"{meta}{meta_norm}.{p}", dv)
    adapter = "vision_embeddings.vision_adapter.mlp."
    recipes[f"{hf}vision_adapter.mlp.fc1.weight"] = column(f"{adapter}c_fc.weight", out, shuffled)
    recipes[f"{hf}vision_adapter.mlp.fc2.weight"] = row(f"{adapter}c_proj.weight", out, out)
    recipes["multi_modal_projector.linear_1.weight"] = column(
        "vision_projection.weight", d.dim, out
    )
    return recipes


# ---- files ----------------------------------------------------------------------------------


def read_meta_params(path: Path) -> dict[str, Any]:
    file = path / "params.json"
    if not file.is_file():
        raise CheckpointFileNotFoundError(f"{file}: not found (not a Meta checkpoint)")
    return read_json_object(file, CheckpointError)


def shard_files(path: Path) -> list[Path]:
    """consolidated.00.pth .. consolidated.NN.pth, in model-parallel rank order."""
    found = {int(m[1]): p for p in path.iterdir() if (m := SHARD_FILE.fullmatch(p.name))}
    if not found:
        raise CheckpointFileNotFoundError(f"{path}: no consolidated.NN.pth shard files")
    if sorted(found) != list(range(len(found))):
        names = ", ".join(found[i].name for i in sorted(found))
        raise CheckpointError(
            f"{path}: shard files are not numbered 00..{len(found) - 1:02d}: {names}"
        )
    return [found[i] for i in range(len(found))]


def load_shard(file: Path) -> dict[str, Any]:
    """Memory-map one shard (tensors only; io.BytesIO `_extra_state` entries allowed)."""
    try:
        with torch.serialization.safe_globals([io.BytesIO]):
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file}: corrupt or truncated checkpoint ({reason})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a state dict")
    return state


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view of a CPU tensor (bf16 through its bits)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


# ---- the tensor source --------------------------------------------------------------------


class MetaCheckpoint:
    """A Meta Llama 4 checkpoint directory read as HF-named, HF-layout numpy tensors."""

    def __init__(self, path: str | Path, vision: bool = False) -> None:
        """`vision`: present the multimodal checkpoint (text under `language_model.`, the vision
        tower and projector under HF names; `hf_config()` is a `llama4` config). Otherwise the
        text model alone, with the vision tensors in `unused_keys()`."""
        self.path = Path(path)
        self.vision = vision
        params = read_meta_params(self.path)
        self._config = hf_config_from_params(params)
        self._vision = None
        if vision:
            if params.get("vision_args") is None:
                raise CheckpointError(f"{self.path / 'params.json'}: no vision_args (text only)")
            self._vision = hf_vision_config_from_args(params["vision_args"])
        self._files = shard_files(self.path)
        self._shards: list[dict[str, Any]] | None = [load_shard(f) for f in self._files]
        c = self._config
        dims = _Dims(
            where=self.path,
            n=len(self._files),
            dim=c["hidden_size"],
            vocab=c["vocab_size"],
            q=c["num_attention_heads"] * c["head_dim"],
            kv=c["num_key_value_heads"] * c["head_dim"],
            ffn_dense=c["intermediate_size_mlp"],
            ffn_expert=c["intermediate_size"],
            experts=c["num_local_experts"],
        )
        self._recipes = _recipes(c, dims, set(self._shards[0]))
        if self._vision is not None:
            self._recipes = {TEXT_PREFIX + k: r for k, r in self._recipes.items()}
            self._recipes.update(_vision_recipes(self._vision, dims))
        self._unused = self._check()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self) -> list[str]:
        """Validate every shard against the recipes; return the unused Meta keys."""
        stored = {s.key: s.stored for r in self._recipes.values() for s in r.slabs}
        first = self._tensors()[0]
        for file, shard in zip(self._files, self._tensors()):
            if shard.keys() != first.keys():
                odd = min(shard.keys() ^ first.keys())
                raise CheckpointError(
                    f"{file}: tensor names differ from {self._files[0].name} (e.g. {odd})"
                )
            for key, shape in stored.items():
                if key not in shard:
                    raise CheckpointError(f"{file}: missing tensor {key}")
                tensor = shard[key]
                if not isinstance(tensor, torch.Tensor):
                    raise CheckpointError(
                        f"{file}: {key} is a {type(tensor).__name__}, not a tensor"
                    )
                if tuple(tensor.shape) != shape:
                    raise CheckpointError(
                        f"{file}: tensor {key} has shape {tuple(tensor.shape)}, but params.json "
                        f"with {len(self._files)} shard file(s) implies {shape}"
                    )
                if tensor.dtype not in _NUMPY_DTYPES:
                    raise CheckpointError(
                        f"{file}: tensor {key} has unsupported dtype {tensor.dtype}"
                    )
        vision = self._vision is not None
        unknown = [
            k
            for k in first
            if k not in stored
            and (not UNUSED_KEY.fullmatch(k) or (vision and VISION_KEY.fullmatch(k)))
        ]
        self._unaccounted = [f"{self._files[0]}: unrecognised tensor {k!r}" for k in unknown]
        return sorted(k for k in first if k not in stored and k not in set(unknown))

    def _tensors(self) -> list[dict[str, Any]]:
        if self._shards is None:
            raise CheckpointError(f"{self.path}: checkpoint is closed")
        return self._shards

    def _recipe(self, key: str) -> _Recipe:
        if key not in self._recipes:
            raise CheckpointError(f"{self.path}: no tensor {key!r}")
        return self._recipes[key]

    def hf_config(self) -> dict[str, Any]:
        """The equivalent HF `llama4_text` config.json dict."""
        if self._vision is None:
            return copy.deepcopy(self._config)
        return {
            "model_type": "llama4",
            "architectures": ["Llama4ForConditionalGeneration"],
            "text_config": copy.deepcopy(self._config),
            "vision_config": copy.deepcopy(self._vision),
            **META_IMAGE_TOKEN_IDS,
        }

    def keys(self) -> list[str]:
        """HF text-model tensor names."""
        return list(self._recipes)

    def unused_keys(self) -> list[str]:
        """Meta tensor names with no text-model counterpart (vision, RoPE cache, stats)."""
        return list(self._unused)

    def unaccounted(self) -> list[str]:
        """Meta tensors neither read nor known to be unused (see `check_source`)."""
        return list(self._unaccounted)

    def location(self, key: str) -> str:
        """The shard files and Meta tensors an HF tensor is read from (for error messages)."""
        slabs = self._recipe(key).slabs
        files = self._files if any(s.shard_dim is not None for s in slabs) else self._files[:1]
        metas = sorted({s.key for s in slabs})
        return f"{', '.join(map(str, files))} [{', '.join(metas)}]"

    def shape(self, key: str) -> tuple[int, ...]:
        """HF shape of `key`, without reading data."""
        recipe = self._recipe(key)
        shape = self._raw_shape(recipe)
        return shape[::-1] if recipe.transpose else shape

    def dtype(self, key: str) -> np.dtype:
        """Stored dtype of `key` (bf16 as ml_dtypes.bfloat16)."""
        return _NUMPY_DTYPES[self._tensors()[0][self._recipe(key).slabs[0].key].dtype]

    def get(self, key: str) -> np.ndarray:
        """One HF tensor, copied out of the memory-mapped shards."""
        recipe = self._recipe(key)
        out = np.empty(self._raw_shape(recipe), self.dtype(key))
        offset = 0  # along the last axis, where the slabs (gate | up) are concatenated
        for slab in recipe.slabs:
            for rank, piece in enumerate(self._pieces(slab)):
                start = [0] * out.ndim
                start[-1] = offset
                if slab.shard_dim is not None:
                    start[slab.shard_dim] += rank * piece.shape[slab.shard_dim]
                out[tuple(slice(a, a + n) for a, n in zip(start, piece.shape))] = piece
            offset += slab.merged_shape(len(self._files))[-1]
        return np.ascontiguousarray(out.T) if recipe.transpose else out

    def close(self) -> None:
        """Drop the memory maps."""
        self._shards = None

    def _raw_shape(self, recipe: _Recipe) -> tuple[int, ...]:
        """Shape before the transpose: slab shapes concatenated along the last axis."""
        shapes = [s.merged_shape(len(self._files)) for s in recipe.slabs]
        return (*shapes[0][:-1], sum(s[-1] for s in shapes))

    def _pieces(self, slab: _Slab) -> Iterator[np.ndarray]:
        """Each shard's piece of `slab` (shard 0's alone for replicated tensors)."""
        shards = self._tensors() if slab.shard_dim is not None else self._tensors()[:1]
        for shard in shards:
            piece = _numpy(shard[slab.key])
            if slab.rows is not None:
                piece = piece[slice(*slab.rows)]
            if slab.view is not None:
                piece = piece.reshape(slab.view)
            yield piece


class StreamingMeta:
    """`MetaCheckpoint` re-opened after every REMAP_BYTES read: its shard files are
    memory-mapped, and the pages a read touched stay in RSS until the maps are dropped."""

    def __init__(self, ckpt: MetaCheckpoint):
        self.path = ckpt.path
        self._ckpt = ckpt
        self._read_bytes = 0

    def __getattr__(self, name: str) -> Any:  # hf_config, keys, shape, dtype, location, ...
        if name == "_ckpt":
            raise AttributeError(name)
        return getattr(self._ckpt, name)

    def get(self, key: str) -> np.ndarray:
        array = self._ckpt.get(key)  # a copy out of the maps
        self._read_bytes += array.nbytes
        if self._read_bytes >= REMAP_BYTES:
            self._ckpt.close()
            self._ckpt = type(self._ckpt)(self.path, vision=self._ckpt.vision)
            self._read_bytes = 0
        return array

    def close(self) -> None:
        self._ckpt.close()
