"""Every stored tensor is accounted for: `l4jax convert` (and loading) refuses tensors the model
does not read, whatever an index says, naming the tensor and file; `--allow-unexpected` leaves
them out and lists them. Hugging Face (indexed or not), Meta `.pth` shards, l4jax checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_reference import TOP2_LIKE, build_hf_model
from meta_reference import TINY_META_PARAMS, build_meta_model, save_meta_checkpoint
from safetensors.numpy import load_file, save_file

import l4jax
from l4jax.cli import main
from l4jax.convert.conversion import convert_checkpoint
from l4jax.errors import CheckpointError

INDEX = "model.safetensors.index.json"
BIAS = "model.layers.0.self_attn.q_proj.bias"


@pytest.fixture(scope="module")
def hf_tensors(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("hf") / "hf"
    build_hf_model(TOP2_LIKE, seed=3).save_pretrained(path)
    return path, load_file(path / "model.safetensors")


def indexed(src: tuple[Path, dict[str, np.ndarray]], dst: Path, edit=None) -> Path:
    """`src` as two shards and an index; `edit(shards, weight_map)` may damage them."""
    path, tensors = src
    dst.mkdir(parents=True)
    shutil.copy(path / "config.json", dst)
    keys = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": {k: tensors[k] for k in keys[: len(keys) // 2]},
        "model-00002-of-00002.safetensors": {k: tensors[k] for k in keys[len(keys) // 2 :]},
    }
    weight_map = {k: file for file, shard in shards.items() for k in shard}
    if edit is not None:
        edit(shards, weight_map)
    for file, shard in shards.items():
        save_file(shard, dst / file)
    (dst / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def run_convert(capsys, src: Path, dst: Path, *args: str) -> tuple[int, list[str]]:
    code = main(["convert", str(src), str(dst), *args])
    err = capsys.readouterr().err.replace("\r", "\n")
    return code, [line.strip() for line in err.splitlines() if line.startswith("l4jax convert:")]


def refused(capsys, src: Path, dst: Path, match: str) -> None:
    code, lines = run_convert(capsys, src, dst)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("l4jax convert: error: "), lines
    assert match in lines[0], lines
    assert not dst.parent.exists() or not list(dst.parent.iterdir())


def test_clean_indexed_checkpoint_converts(hf_tensors, tmp_path, capsys):
    src = indexed(hf_tensors, tmp_path / "src")
    code, lines = run_convert(capsys, src, tmp_path / "out" / "dst")
    assert code == 0 and not [line for line in lines if "skipped" in line], lines


def test_extra_tensor_in_a_shard_but_not_in_the_index(hf_tensors, tmp_path, capsys):
    """The issue's case: a variant architecture's q_proj bias, in a shard, missing from the
    index, used to convert with exit 0 and the bias silently gone."""
    bias = np.ones(hf_tensors[1]["model.layers.0.self_attn.q_proj.weight"].shape[0], np.float32)

    def add_bias(shards, weight_map):
        shards["model-00001-of-00002.safetensors"][BIAS] = bias

    src = indexed(hf_tensors, tmp_path / "src", add_bias)
    shard = src / "model-00001-of-00002.safetensors"
    refused(capsys, src, tmp_path / "out" / "dst", f"{shard}: tensor {BIAS!r} (not in {INDEX})")
    with pytest.raises(CheckpointError, match="q_proj.bias"):
        l4jax.from_pretrained(src)
    code, lines = run_convert(capsys, src, tmp_path / "out" / "dst", "--allow-unexpected")
    assert code == 0
    assert f"l4jax convert: skipped {shard}: tensor {BIAS!r} (not in {INDEX})" in lines
    assert (tmp_path / "out" / "dst" / "config.json").is_file()


def test_extra_tensor_listed_in_the_index(hf_tensors, tmp_path, capsys):
    def add_bias(shards, weight_map):
        shards["model-00002-of-00002.safetensors"][BIAS] = np.ones(64, np.float32)
        weight_map[BIAS] = "model-00002-of-00002.safetensors"

    src = indexed(hf_tensors, tmp_path / "src", add_bias)
    match = f"model-00002-of-00002.safetensors: unexpected tensor {BIAS!r}"
    refused(capsys, src, tmp_path / "out" / "dst", match)


def test_tensor_in_the_index_but_absent_from_its_shard(hf_tensors, tmp_path, capsys):
    def move(shards, weight_map):  # stored in shard 2, indexed in shard 1
        key = next(iter(shards["model-00002-of-00002.safetensors"]))
        weight_map[key] = "model-00001-of-00002.safetensors"

    src = indexed(hf_tensors, tmp_path / "src", move)
    for args in ((), ("--allow-unexpected",)):  # never skippable: the model needs it
        code, lines = run_convert(capsys, src, tmp_path / "out" / "dst", *args)
        assert code == 2 and len(lines) == 1, lines
        assert "model-00001-of-00002.safetensors: no tensor 'model." in lines[0]
        assert f"which {INDEX} places in this file" in lines[0]


def test_shard_the_index_does_not_name(hf_tensors, tmp_path, capsys):
    src = indexed(hf_tensors, tmp_path / "src")
    save_file({"stale": np.zeros(3, np.float32)}, src / "model-00003-of-00003.safetensors")
    match = f"model-00003-of-00003.safetensors: 1 tensor(s) in a file {INDEX} does not name"
    refused(capsys, src, tmp_path / "out" / "dst", match)
    code, lines = run_convert(capsys, src, tmp_path / "out" / "dst", "--allow-unexpected")
    assert code == 0 and any(line.endswith("does not name") for line in lines), lines


def test_same_tensor_in_two_unindexed_files(hf_tensors, tmp_path, capsys):
    path, tensors = hf_tensors
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(path / "config.json", src)
    save_file(tensors, src / "a.safetensors")
    save_file({"model.norm.weight": tensors["model.norm.weight"]}, src / "b.safetensors")
    refused(capsys, src, tmp_path / "out" / "dst", "tensor 'model.norm.weight' is also in")


def test_meta_unrecognised_tensor(tmp_path, capsys):
    model = build_meta_model(TINY_META_PARAMS, seed=0)
    extra = {"layers.0.attention.wq.bias": torch.zeros(64)}
    src = save_meta_checkpoint(model, TINY_META_PARAMS, tmp_path / "meta", 2, "fused", extra=extra)
    match = "consolidated.00.pth: unrecognised tensor 'layers.0.attention.wq.bias'"
    refused(capsys, src, tmp_path / "out" / "dst", match)
    code, lines = run_convert(capsys, src, tmp_path / "out" / "dst", "--allow-unexpected")
    assert code == 0 and any("skipped" in line and "wq.bias" in line for line in lines), lines


def test_l4jax_array_the_metadata_does_not_name(hf_tensors, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    convert_checkpoint(hf_tensors[0], ckpt, progress=False)
    stray = ckpt / "params" / "layers.layer_0.self_attn.q_bias"
    shutil.copytree(ckpt / "params" / "norm.scale", stray)
    refused(capsys, ckpt, tmp_path / "out" / "dst", f"{stray}: array not in _METADATA")
    with pytest.raises(CheckpointError, match="q_bias: array not in _METADATA"):
        l4jax.from_pretrained(ckpt)
