"""LoRA: low-rank adapters on a frozen base, sharded like the weights they adapt.

A targeted weight W [batch.., in.., out..] (batch: the stacked layer axis and, for routed
experts, the expert axis: one adapter per expert) gets A [batch.., in.., r] and
B [batch.., r, out..]; the model uses W + (alpha / r) A @ B (`l4jax.model.param`, one layer at
a time inside the layer scan). A starts random (normal, std 1/sqrt(fan_in)), B at zero, so a
fresh adapter gives exactly the base model. Only A and B are trained (optimizer state exists
for them alone); they carry the logical axes of W (plus `lora_rank`, unsharded), so they shard
with their base weights on any mesh.

Targets, by logical name: `q_proj`, `k_proj`, `v_proj`, `o_proj` (`attention`: all four),
`shared_expert` (its gate/up/down), `experts` (routed experts' gate/up/down, per expert),
`mlp` (the dense layers' gate/up/down).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from l4jax.config import Llama4Config
from l4jax.errors import ConfigError
from l4jax.model import LORA, Llama4ForCausalLM, lora_delta, param_logical_axes
from l4jax.post.init_from import load_init
from l4jax.quantization import QArray, quantize

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
TARGETS = (*ATTENTION, "attention", "shared_expert", "experts", "mlp")
BATCH_AXES = ("layers", "expert")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attention",)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"--lora-rank: must be a positive int, got {self.rank!r}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"--lora-targets: {bad or 'none'} not in {TARGETS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _target_of(path: tuple[str, ...]) -> str | None:
    """The target name a param path belongs to (None: never adapted)."""
    name, parent = path[-1], path[-2] if len(path) > 1 else ""
    if parent == "self_attn" and name in ATTENTION:
        return name
    if name in ("gate_proj", "up_proj", "down_proj"):
        if parent == "shared_expert":
            return "shared_expert"
        if parent == "feed_forward":
            return None  # decided by the expert axis (see `_targeted`)
    return None


def _targeted(path: tuple[str, ...], spec: PartitionSpec, targets: tuple[str, ...]) -> bool:
    target = _target_of(path)
    if target is None and path[-1] in ("gate_proj", "up_proj", "down_proj"):
        if len(path) > 1 and path[-2] == "feed_forward":
            target = "experts" if "expert" in tuple(spec) else "mlp"
    if target is None:
        return False
    return target in targets or (target in ATTENTION and "attention" in targets)


def _split(path: tuple[str, ...], spec: tuple[Any, ...]) -> tuple[int, int]:
    """(batch axes, input axes) of a weight: o_proj reads (heads, head_dim), others one axis."""
    nb = 0
    while nb < len(spec) and spec[nb] in BATCH_AXES:
        nb += 1
    return nb, 2 if path[-1] == "o_proj" else 1


def _walk(tree: Any, prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _walk(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def adapter_layout(config: Llama4Config, lora: LoraConfig) -> tuple[dict, dict]:
    """(ShapeDtypeStructs, logical PartitionSpecs) of the adapters, as nested dicts."""
    abstract = jax.eval_shape(
        Llama4ForCausalLM(config).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)
    )["params"]
    abstract = nn.unbox(abstract)
    specs = param_logical_axes(config)
    shapes, axes = {}, {}
    for path, spec in _walk(jax.tree.map(tuple, specs, is_leaf=_is_spec)):
        if not _targeted(path, PartitionSpec(*spec), lora.targets):
            continue
        shape = _get(abstract, path).shape
        nb, ni = _split(path, spec)
        a_shape = (*shape[: nb + ni], lora.rank)
        b_shape = (*shape[:nb], lora.rank, *shape[nb + ni :])
        parent, name = path[:-1], path[-1]
        _set(shapes, (*parent, f"{name}_a"), jax.ShapeDtypeStruct(a_shape, jnp.float32))
        _set(shapes, (*parent, f"{name}_b"), jax.ShapeDtypeStruct(b_shape, jnp.float32))
        _set(axes, (*parent, f"{name}_a"), PartitionSpec(*spec[: nb + ni], "lora_rank"))
        _set(axes, (*parent, f"{name}_b"), PartitionSpec(*spec[:nb], "lora_rank", *spec[nb + ni :]))
    if not shapes:
        raise ConfigError(f"--lora-targets {','.join(lora.targets)}: no such weights in the model")
    return shapes, axes


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def init_adapters(rng: jax.Array, config: Llama4Config, lora: LoraConfig) -> dict:
    """Fresh adapters: A ~ normal(0, 1/fan_in), B = 0 (the adapted model equals the base)."""
    shapes, axes = adapter_layout(config, lora)
    out: dict = {}
    for i, (path, s) in enumerate(_walk(shapes)):
        if path[-1].endswith("_b"):
            _set(out, path, jnp.zeros(s.shape, s.dtype))
            continue
        spec = _get(axes, path)
        nb = sum(1 for a in spec if a in BATCH_AXES)
        fan_in = 1
        for d in s.shape[nb:-1]:
            fan_in *= d
        key = jax.random.fold_in(rng, i)
        _set(out, path, jax.random.normal(key, s.shape, s.dtype) * fan_in**-0.5)
    return out


def scaled(adapters: dict, lora: LoraConfig) -> dict:
    """The adapters as the model reads them (`l4jax.model.LORA`): B times alpha / r."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x * lora.scale if p[-1].key.endswith("_b") else x, adapters
    )


def apply_variables(base: Any, adapters: dict, lora: LoraConfig) -> dict:
    """Flax variables of the adapted model."""
    return {"params": base, LORA: scaled(adapters, lora)}


def merge(base: Any, adapters: dict, lora: LoraConfig, dtype: Any = None) -> Any:
    """Base params with every adapter folded in: W + (alpha / r) A @ B, in `dtype` (default:
    W's; fp32 for a quantized W: QLoRA's targeted weights are dequantized, and the merged
    weight, like the adapted model's, is a plain array). Untargeted weights stay as they are."""
    merged = jax.tree.map(lambda x: x, base, is_leaf=lambda x: isinstance(x, QArray))
    ab = scaled(adapters, lora)
    for path, a in _walk(ab):
        if not path[-1].endswith("_a"):
            continue
        parent, name = path[:-1], path[-1][: -len("_a")]
        w = _get(merged, (*parent, name))
        b = _get(ab, (*parent, f"{name}_b"))
        new = w.astype(jnp.float32) + lora_delta(a, b, len(w.shape))
        to = dtype or (jnp.float32 if isinstance(w, QArray) else w.dtype)
        _set(merged, (*parent, name), new.astype(to))
    return merged


# ---- l4jax merge-lora ------------------------------------------------------------------------


def merge_lora_run(run_dir: str | os.PathLike, dst: str | os.PathLike, step: int | None = None):
    """Fold the adapters of a LoRA training run (its latest step, or `step`) into the base
    and write a plain l4jax checkpoint to `dst` (`config.json` + Orbax `params/`), which
    `from_pretrained`, `l4jax generate` and `l4jax convert --to hf` read. Returns (dst, config).
    """
    import orbax.checkpoint as ocp

    from l4jax.checkpoint import TRAIN_CONFIG_FILE, read_run_config, step_dir
    from l4jax.convert.streaming import atomic_directory
    from l4jax.errors import read_json_object

    run, dst = Path(run_dir).absolute(), Path(dst).absolute()
    if dst.exists():
        raise ConfigError(f"{dst}: already exists")
    tc = read_json_object(run / TRAIN_CONFIG_FILE)
    post = tc.get("post") or {}
    if not post.get("lora_rank"):
        raise ConfigError(f"{run}: not a LoRA run (train_config.json has no post.lora_rank)")
    lora = LoraConfig(post["lora_rank"], post["lora_alpha"], tuple(post["lora_targets"]))
    config = read_run_config(run)
    step_params = step_dir(run, step, holding="params") / "params"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes, _ = adapter_layout(config, lora)
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes
    )
    adapters = ocp.StandardCheckpointer().restore(step_params, abstract)
    if post.get("init_from"):
        base = load_init(post["init_from"], config, device, post.get("quantize"))
    else:  # the run's random base: the seed's init, as `l4jax.post.tasks` made it
        model = Llama4ForCausalLM(config)
        init = jax.jit(lambda r: nn.unbox(model.init(r, jnp.zeros((1, 8), jnp.int32))["params"]))
        base = init(jax.random.key(tc.get("seed", 0)))
        if post.get("quantize"):  # QLoRA: the base the adapters were trained on
            base = quantize(base, config, post["quantize"])
    # a QLoRA base: every weight dequantized (adapted ones with their update): a plain checkpoint
    dtype = jnp.dtype(config.param_dtype)
    merged = merge(base, adapters, lora, dtype)
    merged = jax.tree.map(
        lambda w: w.astype(dtype) if isinstance(w, QArray) else w,
        merged, is_leaf=lambda x: isinstance(x, QArray),
    )  # fmt: skip
    with atomic_directory(dst) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / "params", merged)
        checkpointer.wait_until_finished()
        config.to_json_file(tmp / "config.json")
    return dst, config
