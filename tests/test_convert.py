"""`l4jax convert`: HF / Meta / l4jax checkpoints to l4jax or HF, streaming, proven by numbers.

Chunks and pieces are shrunk (module fixture `small_pieces`) so the tiny models still go through
every streaming path: experts read and written a few at a time, many chunks per stored array,
Meta shards re-mapped mid-conversion, several safetensors files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
import torch
import transformers
from hf_reference import MAVERICK_LIKE, TOP2_LIKE, build_hf_model, hf_logits, rel_err
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from meta_reference import TINY_META_PARAMS, build_meta_model, meta_logits, save_meta_checkpoint
from safetensors.numpy import load_file, save_file

import l4jax
from l4jax.cli import main
from l4jax.config import Llama4Config
from l4jax.convert import export as export_mod
from l4jax.convert import hostmem
from l4jax.convert import meta as meta_mod
from l4jax.convert import orbax as orbax_mod
from l4jax.convert import streaming as streaming_mod
from l4jax.convert.conversion import convert_checkpoint
from l4jax.convert.export import export_hf
from l4jax.convert.formats import open_checkpoint
from l4jax.convert.mapping import param_shapes
from l4jax.convert.orbax import chunk_shape, restore_params
from l4jax.convert.streaming import row_ranges
from l4jax.errors import CheckpointError

TOKENS = np.random.default_rng(0).integers(0, 256, (2, 40))  # [B, T]: past MAVERICK_LIKE's chunk
META_TOKENS = np.random.default_rng(1).integers(0, 256, (2, 48))  # past the Meta chunk (16)
FP32_TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def small_pieces():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(orbax_mod, "CHUNK_BYTES", 4096)
        mp.setattr(orbax_mod, "MAX_PENDING_BYTES", 64 * 1024)
        mp.setattr(streaming_mod, "ROW_PIECE_BYTES", 100_000)  # 2 of 16 experts per piece
        mp.setattr(meta_mod, "REMAP_BYTES", 200_000)
        mp.setattr(export_mod, "STAGE_BYTES", 3 * 4096)  # direct writes of a few blocks
        mp.setattr(hostmem, "SMALL_BYTES", 0)  # every piece page-aligned: written directly
        yield


def read_hf(path: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_bit_identical(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for key, array in want.items():
        assert got[key].dtype == array.dtype and got[key].shape == array.shape, key
        assert np.array_equal(got[key].view(np.uint8), array.view(np.uint8)), key


def l4jax_logits(path: Path, tokens: np.ndarray = TOKENS) -> np.ndarray:
    model, params = l4jax.from_pretrained(path, dtype="float32")
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens)))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


# ---- HF -> l4jax -> HF ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model() -> transformers.Llama4ForCausalLM:
    return build_hf_model(MAVERICK_LIKE, seed=0)  # dense and MoE layers, 16 experts


@pytest.fixture(scope="module")
def hf_dirs(hf_model, tmp_path_factory) -> dict[str, Path]:
    """The model saved by transformers in float32 and bfloat16, several files + index."""
    root = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(root / "float32", max_shard_size="200KB")
    build_hf_model(MAVERICK_LIKE, seed=0).to(torch.bfloat16).save_pretrained(
        root / "bfloat16", max_shard_size="200KB"
    )
    return {"float32": root / "float32", "bfloat16": root / "bfloat16"}


@pytest.fixture(scope="module")
def l4jax_fp32(hf_dirs, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("l4jax") / "ckpt"
    result = convert_checkpoint(hf_dirs["float32"], dst, progress=False)
    assert (result.src_format, result.dst_format, result.dtype) == ("hf", "l4jax", "float32")
    return dst


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_l4jax_hf_round_trip_is_bit_identical(hf_dirs, l4jax_fp32, tmp_path, dtype, capsys):
    src = hf_dirs[dtype]
    if dtype == "float32":
        mid = l4jax_fp32
    else:  # through the command line
        mid = tmp_path / "l4jax"
        assert main(["convert", str(src), str(mid)]) == 0
        assert "(hf) -> " in capsys.readouterr().out
    assert sorted(p.name for p in mid.iterdir()) == ["config.json", "params"]
    back = tmp_path / "back"
    assert main(["convert", str(mid), str(back), "--to", "hf"]) == 0
    assert (back / "model.safetensors.index.json").is_file()
    assert_bit_identical(read_hf(back), read_hf(src))
    assert Llama4Config.from_json_file(back / "config.json") == Llama4Config.from_json_file(
        src / "config.json"
    )
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == dtype


@pytest.mark.parametrize("direct", [True, False])
def test_direct_and_buffered_writes(hf_dirs, tmp_path, monkeypatch, direct):
    """O_DIRECT writes (where the filesystem has them) and page-cache writes, same bytes."""
    monkeypatch.setattr(hostmem, "DIRECT", direct)
    opened = []
    open_direct = hostmem.open_direct

    def spy(path):
        opened.append(open_direct(path))
        return opened[-1]

    monkeypatch.setattr(hostmem, "open_direct", spy)
    mid = convert_checkpoint(hf_dirs["bfloat16"], tmp_path / "mid", progress=False).dst
    back = convert_checkpoint(mid, tmp_path / "back", to="hf", progress=False).dst
    assert_bit_identical(read_hf(back), read_hf(hf_dirs["bfloat16"]))
    (tmp_path / "probe").touch()
    if direct and (fd := open_direct(tmp_path / "probe")) is not None:  # (not on tmpfs)
        os.close(fd)
        assert sum(fd is not None for fd in opened) > 10
    else:
        assert not any(fd is not None for fd in opened)


def test_refused_direct_writes_go_through_the_page_cache(hf_dirs, tmp_path, monkeypatch):
    """A filesystem that opens files with O_DIRECT but fails the writes (EINVAL, as some FUSE
    and large-sector ones do): the same bytes, written buffered."""
    import errno
    import fcntl

    pwrite, refused = os.pwrite, []

    def refusing_pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return pwrite(fd, data, offset)

    (tmp_path / "probe").touch()
    if (fd := hostmem.open_direct(tmp_path / "probe")) is None:
        pytest.skip("no O_DIRECT on this filesystem")
    os.close(fd)
    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    mid = convert_checkpoint(hf_dirs["bfloat16"], tmp_path / "mid", progress=False).dst
    back = convert_checkpoint(mid, tmp_path / "back", to="hf", progress=False).dst
    assert_bit_identical(read_hf(back), read_hf(hf_dirs["bfloat16"]))
    assert len(refused) > 10


def test_dtype_option_casts_like_numpy(hf_dirs, tmp_path):
    mid, back = tmp_path / "mid", tmp_path / "back"
    convert_checkpoint(hf_dirs["float32"], mid, dtype="bfloat16", progress=False)
    assert open_checkpoint(mid).dtype("lm_head.weight") == np.dtype(ml_dtypes.bfloat16)
    convert_checkpoint(mid, back, to="hf", progress=False)
    rounded = {k: v.astype(ml_dtypes.bfloat16) for k, v in read_hf(hf_dirs["float32"]).items()}
    assert_bit_identical(read_hf(back), rounded)


def test_export_loads_in_transformers_with_the_same_logits(hf_model, l4jax_fp32, tmp_path):
    ref = hf_logits(hf_model, TOKENS)
    assert rel_err(l4jax_logits(l4jax_fp32), ref) < FP32_TOL  # from_pretrained(l4jax dir)
    convert_checkpoint(l4jax_fp32, tmp_path / "hf", to="hf", progress=False)
    exported = transformers.Llama4ForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager"
    ).eval()
    assert exported.dtype == torch.float32
    np.testing.assert_array_equal(hf_logits(exported, TOKENS), ref)


def test_export_hf_of_in_memory_params_matches_streaming_export(hf_dirs, l4jax_fp32, tmp_path):
    config, params = restore_params(l4jax_fp32)
    dst = export_hf(params, config, tmp_path / "hf", max_shard_bytes=300_000, progress=False)
    assert len(list(dst.glob("*.safetensors"))) > 3
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(read_hf(dst))
    assert_bit_identical(read_hf(dst), read_hf(hf_dirs["float32"]))
    exported = transformers.Llama4ForCausalLM.from_pretrained(dst).eval()
    assert exported.config.num_local_experts == 16


def test_orbax_checkpoint_of_a_training_run_exports_to_hf(hf_dirs, l4jax_fp32, tmp_path):
    """Orbax's own default layout (OCDBT), as a training CheckpointManager saves params."""
    config, params = restore_params(l4jax_fp32)
    run = tmp_path / "run"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(run / "params", params)
    checkpointer.wait_until_finished()
    shutil.copy(l4jax_fp32 / "config.json", run / "config.json")
    convert_checkpoint(run, tmp_path / "hf", to="hf", progress=False)
    assert_bit_identical(read_hf(tmp_path / "hf"), read_hf(hf_dirs["float32"]))


def test_multimodal_checkpoint_converts_its_text_model(small_hf, tmp_path):
    """`language_model.` prefixes and a `text_config`; the vision tensors are left out."""
    tensors = load_file(small_hf / "model.safetensors")
    mm = {f"language_model.{k}": v for k, v in tensors.items()}
    mm["vision_model.patch_embedding.linear.weight"] = np.zeros((8, 4), np.float32)
    (tmp_path / "mm").mkdir()
    save_file(mm, tmp_path / "mm" / "model.safetensors")
    text_config = json.loads((small_hf / "config.json").read_text())
    config = {"model_type": "llama4", "text_config": text_config, "vision_config": {}}
    (tmp_path / "mm" / "config.json").write_text(json.dumps(config))
    convert_checkpoint(tmp_path / "mm", tmp_path / "l4jax", progress=False)
    convert_checkpoint(tmp_path / "l4jax", tmp_path / "hf", to="hf", progress=False)
    assert_bit_identical(read_hf(tmp_path / "hf"), tensors)


# ---- sharded restore --------------------------------------------------------------------------


def _file_bytes_read() -> int:
    metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
    return sum(v["value"] for m in metrics for v in m["values"])


def test_sharded_restore_reads_each_slice_once(l4jax_fp32):
    """Onto 8 devices, each param split along its first (non-scan) axis when chunks allow: every
    device gets only its slice and the whole model is read from disk once, not 8 times."""
    mesh = Mesh(np.array(jax.devices()), ("x",))
    config, single = restore_params(l4jax_fp32)
    shardings, split = {}, []
    for path, shape in param_shapes(config).items():
        stacked = path[0] == "layers"
        axis = int(stacked)
        chunk = chunk_shape(shape, 4, stacked)
        spec = [None] * len(shape)
        if shape[axis] % 8 == 0 and (shape[axis] // 8) % chunk[axis] == 0:
            spec[axis] = "x"
            split.append(path)
        node = shardings
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = NamedSharding(mesh, PartitionSpec(*spec))
    assert ("layers", "layer_1", "feed_forward", "gate_proj") in split and len(split) > 10
    before = _file_bytes_read()
    _, params = restore_params(l4jax_fp32, shardings)
    read = _file_bytes_read() - before
    total = sum(math.prod(s) * 4 for s in param_shapes(config).values())
    assert total <= read < 1.05 * total  # (+ zarr metadata)
    for path in split:
        leaf, want = params, single
        for key in path:
            leaf, want = leaf[key], want[key]
        assert leaf.sharding.spec == shardings_at(shardings, path).spec
        shard, axis = leaf.addressable_shards[3], int(path[0] == "layers")
        assert shard.data.shape[axis] == leaf.shape[axis] // 8
        np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(want)[shard.index])
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), single, shardings
    )
    plain = ocp.StandardCheckpointer().restore(l4jax_fp32 / "params", abstract)
    for got, want in zip(jax.tree.leaves(plain), jax.tree.leaves(single)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def shardings_at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


# ---- Meta -> l4jax / HF -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def meta_reference():
    model = build_meta_model(TINY_META_PARAMS, seed=0)
    return model, meta_logits(model, META_TOKENS)


@pytest.mark.parametrize(("n_shards", "layout"), [(1, "plain"), (2, "fused")])
def test_meta_checkpoint_converts_and_matches_meta_forward(
    meta_reference, tmp_path, n_shards, layout
):
    model, ref = meta_reference
    src = save_meta_checkpoint(model, TINY_META_PARAMS, tmp_path / "meta", n_shards, layout)
    convert_checkpoint(src, tmp_path / "l4jax", progress=False)
    assert rel_err(l4jax_logits(tmp_path / "l4jax", META_TOKENS), ref) < FP32_TOL
    if n_shards == 2:  # Meta straight to HF: transformers agrees with Meta too
        convert_checkpoint(src, tmp_path / "hf", to="hf", progress=False)
        hf = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "hf").eval()
        assert rel_err(hf_logits(hf, META_TOKENS), ref) < FP32_TOL


def test_verify_meta_and_l4jax_checkpoints(meta_reference, l4jax_fp32, tmp_path, capsys):
    model, _ = meta_reference
    src = save_meta_checkpoint(model, TINY_META_PARAMS, tmp_path / "meta", 2, "fused")
    assert main(["verify", str(src), "--tokens", "48"]) == 0
    assert main(["verify", str(l4jax_fp32), "--tokens", "40"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "logits against llama_models" in out[0] and out[1].strip().endswith(" ok")
    assert "transformers, on its Hugging Face export" in out[2] and out[3].strip().endswith(" ok")


# ---- bad input --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small") / "hf"
    build_hf_model(TOP2_LIKE, seed=5).save_pretrained(path)
    return path


def rewrite(src: Path, dst: Path, edit) -> Path:
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def convert_fails(capsys, src: Path, dst: Path, match: str, *args: str) -> None:
    """The CLI exits non-zero with one line naming the problem and leaves nothing behind."""
    before = leftovers(dst.parent) if dst.parent.exists() else []
    assert main(["convert", str(src), str(dst), *args]) != 0
    err = capsys.readouterr().err.split("\r")[-1].strip()  # (after the cleared progress bar)
    assert err.startswith("l4jax convert: error: ") and "\n" not in err, err
    assert match in err, err
    assert (leftovers(dst.parent) if dst.parent.exists() else []) == before


BAD_TENSORS = {
    "missing": (
        lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"),
        "missing tensor 'model.layers.1.self_attn.k_proj.weight'",
    ),
    "extra": (
        lambda t: t.update(extra=np.zeros(3, np.float32)),
        "model.safetensors: unexpected tensor 'extra'",
    ),
    "shape": (
        lambda t: t.update({"model.norm.weight": np.zeros(7, np.float32)}),
        "model.safetensors: tensor 'model.norm.weight' has shape (7,), config expects (64,)",
    ),
}


@pytest.mark.parametrize("bad", BAD_TENSORS)
def test_bad_tensors(small_hf, tmp_path, capsys, bad):
    edit, match = BAD_TENSORS[bad]
    src = rewrite(small_hf, tmp_path / "src", edit)
    convert_fails(capsys, src, tmp_path / "out" / "dst", match)


def test_truncated_safetensors(small_hf, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(small_hf, src)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    convert_fails(capsys, src, tmp_path / "out" / "dst", "model.safetensors: unreadable")


def test_params_json_that_does_not_match_the_tensors(meta_reference, tmp_path, capsys):
    src = save_meta_checkpoint(meta_reference[0], TINY_META_PARAMS, tmp_path / "meta")
    (src / "params.json").write_text(json.dumps({**TINY_META_PARAMS, "n_kv_heads": 4}))
    match = "consolidated.00.pth: tensor layers.0.attention.wk.weight has shape (32, 64)"
    convert_fails(capsys, src, tmp_path / "out" / "dst", match)


def test_unknown_format_missing_source_existing_destination(small_hf, tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"\0" * 16)
    convert_fails(capsys, tmp_path / "junk", tmp_path / "out" / "a", "unknown checkpoint format")
    convert_fails(capsys, tmp_path / "nope", tmp_path / "out" / "b", "no such file or directory")
    (tmp_path / "out" / "taken").mkdir(parents=True)
    convert_fails(capsys, small_hf, tmp_path / "out" / "taken", "taken: already exists")


def test_damaged_l4jax_checkpoint(l4jax_fp32, tmp_path, capsys):
    src = tmp_path / "ckpt"
    shutil.copytree(l4jax_fp32, src)
    chunk = src / "params" / "layers.layer_1.feed_forward.down_proj" / "1.3.0.0"
    chunk.unlink()
    convert_fails(
        capsys, src, tmp_path / "out" / "hf", "layers.layer_1.feed_forward.down_proj", "--to", "hf"
    )
    # in a child: Orbax's failed restore leaves read coroutines that complain at exit
    restore = f"from l4jax.convert.orbax import restore_params; restore_params({str(src)!r})"
    result = run_python("-c", restore)
    assert result.returncode != 0
    assert f"CheckpointError: {src / 'params'}: restore failed" in result.stderr
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_local_experts": 8}))
    match = "layers.layer_1.feed_forward.router: array has shape (2, 64, 16), config.json implies"
    convert_fails(capsys, src, tmp_path / "out" / "hf", match, "--to", "hf")


@pytest.mark.parametrize("to", ["l4jax", "hf"])
def test_interrupted_conversion_leaves_nothing_that_loads(small_hf, tmp_path, monkeypatch, to):
    writer = orbax_mod.L4jaxWriter if to == "l4jax" else export_mod.HFWriter
    write, calls = writer.write, []
    out = tmp_path / "out"

    def write_then_interrupt(self, *args):
        write(self, *args)
        calls.append(1)
        if len(calls) == 20:
            (partial,) = out.glob("dst.partial-*")
            with pytest.raises(CheckpointError, match="unknown checkpoint format"):
                open_checkpoint(partial)
            raise KeyboardInterrupt

    monkeypatch.setattr(writer, "write", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(small_hf, out / "dst", to=to, progress=False)
    assert len(calls) == 20 and leftovers(out) == []


def test_sigterm_stops_the_command_and_cleans_up(small_hf, tmp_path, monkeypatch):
    write, calls = orbax_mod.L4jaxWriter.write, []

    def write_then_terminate(self, *args):
        write(self, *args)
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(orbax_mod.L4jaxWriter, "write", write_then_terminate)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as info:
            main(["convert", str(small_hf), str(tmp_path / "out" / "dst")])
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert info.value.code == 128 + signal.SIGTERM
    assert len(calls) == 5 and leftovers(tmp_path / "out") == []


def run_python(*args: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=root, env=env
    )


def test_module_entry_point_reports_errors_in_one_line(tmp_path):
    result = run_python("-m", "l4jax", "convert", str(tmp_path), str(tmp_path / "dst"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "unknown checkpoint format" in result.stderr


# ---- layout helpers ---------------------------------------------------------------------------


def test_chunks_bound_bytes_divide_the_shape_and_keep_expert_rows():
    mib = 2**20
    for shape, stacked in [((12, 128, 5120, 8192), True), ((202048, 5120), False)]:
        chunk = chunk_shape(shape, 2, stacked, target=32 * mib)
        assert all(s % c == 0 for s, c in zip(shape, chunk)) and math.prod(chunk) * 2 <= 32 * mib
    assert chunk_shape((12, 128, 5120, 8192), 2, True, 32 * mib) == (1, 1, 1280, 8192)
    assert chunk_shape((12, 16, 64, 64), 2, True, 32 * mib) == (1, 16, 64, 64)
    assert chunk_shape((7, 3), 4, True, 8) == (1, 1)  # as small as it gets


def test_expert_tensors_stream_in_whole_row_blocks():
    assert row_ranges((16, 64, 192), 1, 4) == [slice(i, i + 2) for i in range(0, 16, 2)]
    assert row_ranges((16, 64, 192), 4, 4) == [
        slice(0, 4),
        slice(4, 8),
        slice(8, 12),
        slice(12, 16),
    ]
    assert row_ranges((256, 64), 1, 4) == [slice(None)]  # 2-D tensors are read whole
    assert row_ranges((2, 4, 4), 1, 4) == [slice(None)]  # small enough in one piece
