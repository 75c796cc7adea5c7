"""The one table between Hugging Face tensor names/layouts and l4jax's scanned param tree.

Every conversion (HF load, HF export, Meta import through its HF view, streaming to Orbax) walks
`hf_entries(config)`: one `Entry` per HF tensor, saying which l4jax parameter slice(s) it fills
and how to move between the two layouts. Layer i lives in scan group i // p, slot i % p
(p = `config.scan_period`): `params["layers"][f"layer_{i % p}"][...][i // p]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from l4jax.config import Llama4Config
from l4jax.errors import CheckpointError


class TensorSource(Protocol):
    """A checkpoint read tensor by tensor, by HF name, in HF layout."""

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def get(self, key: str) -> np.ndarray: ...
    def location(self, key: str) -> str: ...  # file holding the tensor, for error messages
    def unaccounted(self) -> list[str]: ...  # "FILE: what" of stored tensors no key reaches


@dataclasses.dataclass(frozen=True)
class Slot:
    """One l4jax parameter array (path into the param tree), or one layer of a scanned one."""

    path: tuple[str, ...]
    group: int | None  # scan group index for stacked layer params, None for top-level params
    shape: tuple[int, ...]  # the slice's shape (without the scan axis)


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_key: str
    hf_shape: tuple[int, ...]
    slots: tuple[Slot, ...]
    split: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # HF tensor -> one array per slot
    join: Callable[[tuple[np.ndarray, ...]], np.ndarray]  # inverse


def _identity(hf_shape, slot_shape):
    return (lambda w: (w,)), (lambda xs: xs[0])


def _linear(hf_shape, slot_shape):
    """torch Linear weight [out, in] <-> kernel [in, out] with out/in dims possibly split."""
    out_dim, in_dim = hf_shape

    def split(w):
        return (w.T.reshape(slot_shape),)

    def join(xs):
        return xs[0].reshape(in_dim, out_dim).T

    return split, join


def _gate_up(hf_shape, slot_shape):
    """experts.gate_up_proj [E, D, 2F] (gate first) <-> gate [E, D, F], up [E, D, F]."""
    f = hf_shape[-1] // 2
    return (lambda w: (w[..., :f], w[..., f:])), (lambda xs: np.concatenate(xs, axis=-1))


def _entry(hf_key, hf_shape, slots, layout) -> Entry:
    split, join = layout(hf_shape, slots[0].shape)
    return Entry(hf_key, tuple(hf_shape), tuple(slots), split, join)


def hf_entries(config: Llama4Config) -> list[Entry]:
    """All tensors of a HF `Llama4ForCausalLM` checkpoint, in a stable order."""
    c = config
    d, v, n, k, h = (
        c.hidden_size,
        c.vocab_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
    )
    entries = [
        _entry(
            "model.embed_tokens.weight", (v, d), [Slot(("embed_tokens",), None, (v, d))], _identity
        )
    ]
    p = c.scan_period
    for i, kind in enumerate(c.layer_kinds):
        base = ("layers", f"layer_{i % p}")
        pre = f"model.layers.{i}."

        def slot(*path, shape, _base=base, _g=i // p):
            return Slot(_base + path, _g, shape)

        entries += [
            _entry(
                pre + "input_layernorm.weight",
                (d,),
                [slot("input_layernorm", "scale", shape=(d,))],
                _identity,
            ),
            _entry(
                pre + "post_attention_layernorm.weight",
                (d,),
                [slot("post_attention_layernorm", "scale", shape=(d,))],
                _identity,
            ),
            _entry(
                pre + "self_attn.q_proj.weight",
                (n * h, d),
                [slot("self_attn", "q_proj", shape=(d, n, h))],
                _linear,
            ),
            _entry(
                pre + "self_attn.k_proj.weight",
                (k * h, d),
                [slot("self_attn", "k_proj", shape=(d, k, h))],
                _linear,
            ),
            _entry(
                pre + "self_attn.v_proj.weight",
                (k * h, d),
                [slot("self_attn", "v_proj", shape=(d, k, h))],
                _linear,
            ),
            _entry(
                pre + "self_attn.o_proj.weight",
                (d, n * h),
                [slot("self_attn", "o_proj", shape=(n, h, d))],
                _linear,
            ),
        ]
        ff = pre + "feed_forward."
        if kind.is_moe:
            e, f = c.num_local_experts, c.intermediate_size
            entries += [
                _entry(
                    ff + "router.weight",
                    (e, d),
                    [slot("feed_forward", "router", shape=(d, e))],
                    _linear,
                ),
                _entry(
                    ff + "experts.gate_up_proj",
                    (e, d, 2 * f),
                    [
                        slot("feed_forward", "gate_proj", shape=(e, d, f)),
                        slot("feed_forward", "up_proj", shape=(e, d, f)),
                    ],
                    _gate_up,
                ),
                _entry(
                    ff + "experts.down_proj",
                    (e, f, d),
                    [slot("feed_forward", "down_proj", shape=(e, f, d))],
                    _identity,
                ),
            ]
            mlp_pre, mlp_path, hidden = ff + "shared_expert.", ("feed_forward", "shared_expert"), f
        else:
            mlp_pre, mlp_path, hidden = ff, ("feed_forward",), c.intermediate_size_mlp
        entries += [
            _entry(
                mlp_pre + "gate_proj.weight",
                (hidden, d),
                [slot(*mlp_path, "gate_proj", shape=(d, hidden))],
                _linear,
            ),
            _entry(
                mlp_pre + "up_proj.weight",
                (hidden, d),
                [slot(*mlp_path, "up_proj", shape=(d, hidden))],
                _linear,
            ),
            _entry(
                mlp_pre + "down_proj.weight",
                (d, hidden),
                [slot(*mlp_path, "down_proj", shape=(hidden, d))],
                _linear,
            ),
        ]
    entries.append(
        _entry("model.norm.weight", (d,), [Slot(("norm", "scale"), None, (d,))], _identity)
    )
    if not c.tie_word_embeddings:
        entries.append(
            _entry("lm_head.weight", (v, d), [Slot(("lm_head",), None, (d, v))], _linear)
        )
    return entries


def model_entries(config: Any) -> list[Entry]:
    """`hf_entries` of a text config, `multimodal_entries` of a `Llama4MultimodalConfig`."""
    return multimodal_entries(config) if hasattr(config, "vision") else hf_entries(config)


def param_shapes(config: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Full shapes of every l4jax parameter (scanned ones with their leading group axis) of a
    text or multimodal config."""
    return entry_shapes(model_entries(config))


def check_source(
    source: TensorSource, config: Llama4Config, entries: list[Entry], allow_unexpected: bool = False
) -> list[str]:
    """Missing, unexpected or misshapen tensors -> CheckpointError naming the tensor and file.

    Every stored tensor must be accounted for: unexpected ones (not in `entries`) and the
    source's `unaccounted()` ones (e.g. in a shard its index does not name) raise too, unless
    `allow_unexpected`; then they are skipped, and returned as "FILE: what" lines.
    """
    expected = {e.hf_key: e.hf_shape for e in entries}
    present = set(source.keys())
    missing = [key for key in expected if key not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"missing tensor {missing[0]!r}{more}: the checkpoint does not match its config"
        )
    unexpected = sorted(present - set(expected))
    skipped = [f"{source.location(k)}: unexpected tensor {k!r}" for k in unexpected]
    skipped += source.unaccounted()
    if skipped and not allow_unexpected:
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise CheckpointError(
            f"{skipped[0]}{more} for this config (--allow-unexpected skips such tensors)"
        )
    for key, shape in expected.items():
        got = tuple(source.shape(key))
        if got != shape:
            raise CheckpointError(
                f"{source.location(key)}: tensor {key!r} has shape {got}, config expects {shape}"
            )
    return skipped


def iter_slices(
    source: TensorSource, entries: list[Entry], dtype: Any = None
) -> Iterator[tuple[Slot, np.ndarray]]:
    """Read each HF tensor once, yield every l4jax slot it fills, cast to `dtype` if given."""
    for entry in entries:
        for slot, array in zip(entry.slots, entry.split(source.get(entry.hf_key))):
            yield slot, (array if dtype is None else array.astype(dtype))


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def get_path(tree: dict, path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


# ---- multimodal checkpoints (HF `Llama4ForConditionalGeneration`) ----------------------------

TEXT_PREFIX = "language_model."  # HF name prefix of the text model in multimodal checkpoints


def _reshape(hf_shape, slot_shape):
    """A bias [N*H] <-> [N, H]."""
    return (lambda w: (w.reshape(slot_shape),)), (lambda xs: xs[0].reshape(hf_shape))


def vision_entries(vision: Any, text_hidden_size: int) -> list[Entry]:
    """The vision tower and projector of a multimodal checkpoint (`vision` is a
    `l4jax.vision_config.Llama4VisionConfig`); its 1 + num_hidden_layers blocks are one scan axis:
    layer i is `params["vision_model"]["layers"][...][i]`."""
    v = vision
    d, k, h, f = v.hidden_size, v.num_attention_heads, v.head_dim, v.intermediate_size
    c, p = v.num_channels * v.patch_size**2, v.projector_output_dim

    def top(key, hf_shape, path, shape, layout, root="vision_model"):
        return _entry(key, hf_shape, [Slot((root, *path), None, shape)], layout)

    def norm(key, path, dim, slot=top):
        return [
            slot(f"{key}.weight", (dim,), (*path, "scale"), (dim,), _identity),
            slot(f"{key}.bias", (dim,), (*path, "bias"), (dim,), _identity),
        ]

    pre = "vision_model."
    entries = [
        top(pre + "patch_embedding.linear.weight", (d, c), ("patch_embedding",), (c, d), _linear),
        top(pre + "class_embedding", (d,), ("class_embedding",), (d,), _identity),
        top(
            pre + "positional_embedding_vlm",
            (v.num_patches + 1, d),
            ("positional_embedding_vlm",),
            (v.num_patches + 1, d),
            _identity,
        ),
        *norm(pre + "layernorm_pre", ("layernorm_pre",), d),
        *norm(pre + "layernorm_post", ("layernorm_post",), d),
    ]
    for i in range(v.num_hidden_layers):
        lp = f"{pre}model.layers.{i}."

        def layer(key, hf_shape, path, shape, layout, _i=i):
            slot = Slot(("vision_model", "layers", *path), _i, shape)
            return _entry(key, hf_shape, [slot], layout)

        for x in "qkv":
            entries += [
                layer(f"{lp}self_attn.{x}_proj.weight", (k * h, d), ("self_attn", f"{x}_proj"),
                      (d, k, h), _linear),
                layer(f"{lp}self_attn.{x}_proj.bias", (k * h,), ("self_attn", f"{x}_bias"),
                      (k, h), _reshape),
            ]  # fmt: skip
        entries += [
            layer(f"{lp}self_attn.o_proj.weight", (d, k * h), ("self_attn", "o_proj"), (k, h, d),
                  _linear),
            layer(f"{lp}self_attn.o_proj.bias", (d,), ("self_attn", "o_bias"), (d,), _identity),
            layer(f"{lp}mlp.fc1.weight", (f, d), ("fc1", "kernel"), (d, f), _linear),
            layer(f"{lp}mlp.fc1.bias", (f,), ("fc1", "bias"), (f,), _identity),
            layer(f"{lp}mlp.fc2.weight", (d, f), ("fc2", "kernel"), (f, d), _linear),
            layer(f"{lp}mlp.fc2.bias", (d,), ("fc2", "bias"), (d,), _identity),
            *norm(lp + "input_layernorm", ("input_layernorm",), d, layer),
            *norm(lp + "post_attention_layernorm", ("post_attention_layernorm",), d, layer),
        ]  # fmt: skip
    adapter = pre + "vision_adapter.mlp."
    pin = v.projector_input_dim
    entries += [
        top(adapter + "fc1.weight", (pin, f), ("adapter_fc1", "kernel"), (f, pin), _linear),
        top(adapter + "fc2.weight", (p, pin), ("adapter_fc2", "kernel"), (pin, p), _linear),
        top(
            "multi_modal_projector.linear_1.weight",
            (text_hidden_size, p),
            ("kernel",),
            (p, text_hidden_size),
            _linear,
            root="multi_modal_projector",
        ),
    ]
    return entries


def prefixed(entries: list[Entry], hf_prefix: str, path_prefix: tuple[str, ...]) -> list[Entry]:
    """`entries` with `hf_prefix` before every HF name and `path_prefix` before every slot path."""
    return [
        dataclasses.replace(
            e,
            hf_key=hf_prefix + e.hf_key,
            slots=tuple(dataclasses.replace(s, path=path_prefix + s.path) for s in e.slots),
        )
        for e in entries
    ]


def multimodal_entries(config: Any) -> list[Entry]:
    """All tensors of a HF `Llama4ForConditionalGeneration` checkpoint (`config` is a
    `l4jax.vision_config.Llama4MultimodalConfig`): the text model's under `language_model.` (params
    `["language_model"]`), then the vision tower's and the projector's."""
    text = prefixed(hf_entries(config.text), TEXT_PREFIX, ("language_model",))
    return text + vision_entries(config.vision, config.text.hidden_size)


def entry_shapes(entries: list[Entry]) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Full param shapes of `entries`' slots; stacked ones get a leading axis of 1 + max group."""
    groups: dict[tuple[str, ...], int] = {}
    shapes: dict[tuple[str, ...], tuple[int, ...]] = {}
    for entry in entries:
        for s in entry.slots:
            shapes[s.path] = s.shape
            if s.group is not None:
                groups[s.path] = max(groups.get(s.path, 0), s.group + 1)
    return {
        path: ((groups[path], *shape) if path in groups else shape)
        for path, shape in shapes.items()
    }
