"""Peak host memory and throughput of streaming conversion, against loading everything.

Writes a synthetic Hugging Face Llama 4 checkpoint (real key names and layouts, bf16, many
experts; >= 4 GB by default), then runs, each in a child process whose peak RSS the kernel
reports (`os.wait4`):

    copy                  the checkpoint's files copied (+ fsync): the I/O floor
    hf -> l4jax           `l4jax convert SRC DST` (streaming)
    hf -> l4jax, naive    every tensor loaded (`read_params`), then one Orbax save
    hf -> l4jax int4      `l4jax convert SRC DST --quantize int4` (with `--quantize MODE`)
    l4jax -> hf           `l4jax convert DST HF --to hf` (streaming)
    l4jax -> hf, naive    every param restored, every HF tensor built, then safetensors save
    imports only          the child's fixed cost (Python, JAX, tensorstore imported)

and prints seconds, MB/s (checkpoint bytes / conversion time, imports excluded), peak RSS
and its share of the checkpoint size, and the ratios the issue sets targets for: streaming
peak RSS < 25% of the checkpoint, streaming throughput within 2x of the copy. Every run
starts with its source read into the page cache (the conversions write with O_DIRECT, so the
l4jax checkpoint would otherwise be read from disk) and after `sync` (no run flushes another's
writes), and ends with its own data on disk (fsync). With `--repeat N` the copy and the two
streaming conversions run N times, interleaved, and the table gives each one's median run
(and the range of its MB/s); `--no-naive` skips the load-everything runs (they need about 3x
the checkpoint in RAM).

    python benchmarks/convert_memory.py [--gb 4.0] [--repeat 1] [--no-naive] [--quantize int4]
        [--workdir /tmp]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The parent imports nothing heavy: a child's peak RSS (ru_maxrss) starts at its parent's RSS
# when forked, so the synthetic checkpoint is written by a child too.

FILE_BYTES = 2**30  # synthetic checkpoint files of about 1 GiB, as transformers shards


def synthetic_config(target_gb: float):
    """Few layers, many large experts (as Maverick's MoE layers dominate its size): layers are
    added until the bf16 checkpoint reaches `target_gb`."""
    from l4jax.config import Llama4Config

    fields = dict(
        vocab_size=32768,
        hidden_size=1024,
        intermediate_size=1024,
        intermediate_size_mlp=2048,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        num_local_experts=128,
        interleave_moe_layer_step=1,
        attention_chunk_size=8192,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    layers = 1
    while Llama4Config.make(num_hidden_layers=layers, **fields).num_params() * 2 < target_gb * 1e9:
        layers += 1
    return Llama4Config.make(num_hidden_layers=layers, **fields)


def write_synthetic_hf(target_gb: float, path: Path) -> dict:
    """Random bf16 tensors under every HF name (no NaN/inf), in ~1 GiB files with an index."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    from l4jax.convert.mapping import hf_entries

    config = synthetic_config(target_gb)

    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    weight_map, files, shard, size, total = {}, [], {}, 0, 0

    def flush():
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        files.append(name)

    for entry in hf_entries(config):
        bits = rng.integers(0, 2**16, entry.hf_shape, dtype=np.uint16) & 0xBFFF  # |x| < 2
        array = bits.view(ml_dtypes.bfloat16)
        if shard and size + array.nbytes > FILE_BYTES:
            flush()
            shard, size = {}, 0
        shard[entry.hf_key] = array
        size += array.nbytes
        total += array.nbytes
    flush()
    hf = config.replace(param_dtype="bfloat16").to_hf_dict()
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    largest = max(math.prod(e.hf_shape) for e in hf_entries(config)) * 2
    return {
        "nbytes": total,
        "about": f"{total / 1e9:.2f} GB bf16 in {len(files)} files: {config.num_hidden_layers} "
        f"MoE layers x {config.num_local_experts} experts, hidden {config.hidden_size}, expert "
        f"hidden {config.intermediate_size}, largest tensor {largest / 1e6:.0f} MB",
    }


# ---- the child processes ----------------------------------------------------------------------


def child(mode: str, src: str, dst: str) -> dict:
    """Run one measured task; returns its own wall and CPU seconds (imports excluded)."""
    if mode == "synth":
        return write_synthetic_hf(float(src), Path(dst))
    if mode != "copy":
        import l4jax.convert.conversion  # noqa: F401 (the fixed cost "imports only" shows)
    start, cpu = time.perf_counter(), _cpu_seconds()
    run_task(mode, src, dst)
    return {"seconds": time.perf_counter() - start, "cpu": _cpu_seconds() - cpu}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads (tensorstore's too)
    return usage.ru_utime + usage.ru_stime


def run_task(mode: str, src: str, dst: str) -> None:
    if mode == "copy":
        Path(dst).mkdir()
        for file in sorted(Path(src).iterdir()):
            shutil.copyfile(file, Path(dst) / file.name)
            with open(Path(dst) / file.name, "rb+") as f:
                os.fsync(f.fileno())
    elif mode == "stream_l4jax":
        from l4jax.convert.conversion import convert_checkpoint

        convert_checkpoint(src, dst, progress=False)
    elif mode.startswith("stream_quantize_"):
        from l4jax.convert.conversion import convert_checkpoint

        convert_checkpoint(src, dst, progress=False, quantize=mode.rsplit("_", 1)[1])
    elif mode == "stream_hf":
        from l4jax.convert.conversion import convert_checkpoint

        convert_checkpoint(src, dst, to="hf", progress=False)
    elif mode == "naive_l4jax":
        naive_hf_to_l4jax(Path(src), Path(dst))
    elif mode == "naive_hf":
        naive_l4jax_to_hf(Path(src), Path(dst))
    elif mode != "imports":
        raise ValueError(mode)


def naive_hf_to_l4jax(src: Path, dst: Path) -> None:
    """What a load-everything converter does: the whole param tree in memory, then save."""
    import orbax.checkpoint as ocp

    from l4jax.convert.formats import source_config
    from l4jax.convert.hf import HFCheckpoint
    from l4jax.convert.load import read_params

    source = HFCheckpoint(src)
    config = source_config(source, param_dtype="bfloat16", dtype="bfloat16")
    params = read_params(source, config)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(dst.absolute() / "params", params)
    checkpointer.wait_until_finished()
    (dst / "config.json").write_text(json.dumps(config.to_hf_dict()))


def naive_l4jax_to_hf(src: Path, dst: Path) -> None:
    """Every param restored, every HF tensor built in memory, then written."""
    import jax
    import numpy as np
    from safetensors.numpy import save_file

    from l4jax.convert.mapping import get_path, hf_entries
    from l4jax.convert.orbax import restore_params

    config, params = restore_params(src)
    host = jax.device_get(params)
    tensors = {}
    for entry in hf_entries(config):
        parts = tuple(
            get_path(host, s.path) if s.group is None else get_path(host, s.path)[s.group]
            for s in entry.slots
        )
        tensors[entry.hf_key] = np.ascontiguousarray(entry.join(parts))
    dst.mkdir()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config.to_hf_dict()))


def warm(src: Path) -> None:
    """Read every file under `src` once (into the page cache; 1 MiB of this process's RSS)."""
    buffer = bytearray(2**20)
    for file in sorted(p for p in Path(src).rglob("*") if p.is_file()):
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def measure(mode: str, src: Path, dst: Path) -> dict:
    """Run `mode` in a child; its peak RSS (bytes), wall and own seconds."""
    cmd = [sys.executable, __file__, "--child", mode, str(src), str(dst)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # (reaps it: rusage of this child alone)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"{mode}: child failed ({proc.returncode}):\n{tail}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    return {**result, "wall": wall, "peak_rss": usage.ru_maxrss * 1024}  # ru_maxrss: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=4.0, help="checkpoint size to synthesise")
    parser.add_argument("--repeat", type=int, default=1, help="runs of copy and streaming")
    parser.add_argument("--no-naive", action="store_true", help="skip load-everything runs")
    parser.add_argument("--workdir", default="/tmp", help="where the checkpoints are written")
    parser.add_argument(
        "--quantize", choices=("int4", "int8", "fp8"), help="also hf -> l4jax quantized"
    )
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    work = Path(tempfile.mkdtemp(prefix="l4jax-convert-bench-", dir=args.workdir))
    free = shutil.disk_usage(work).free
    if free < 4 * args.gb * 1e9:
        raise SystemExit(f"{work}: {free / 1e9:.0f} GB free, need {4 * args.gb:.0f} GB")
    try:
        src, l4 = work / "hf", work / "l4jax"
        synth = measure("synth", args.gb, src)
        nbytes = synth["nbytes"]
        print(f"synthetic HF checkpoint: {synth['about']} (written in {synth['wall']:.0f} s)")
        runs = [
            ("imports only", "imports", src, work / "none"),
            ("copy (+fsync)", "copy", src, work / "copy"),
            ("hf -> l4jax", "stream_l4jax", src, l4),
            ("hf -> l4jax, naive", "naive_l4jax", src, work / "naive_l4jax"),
            *(
                [
                    (
                        f"hf -> l4jax {args.quantize}",
                        f"stream_quantize_{args.quantize}",
                        src,
                        work / "q",
                    )
                ]
                if args.quantize
                else []
            ),
            ("l4jax -> hf", "stream_hf", l4, work / "hf_out"),
            ("l4jax -> hf, naive", "naive_hf", l4, work / "naive_hf"),
        ]
        repeated = ("copy", "stream_l4jax", "stream_hf", f"stream_quantize_{args.quantize}")
        results: dict[str, list[dict]] = {}
        for i in range(args.repeat):
            for label, mode, a, b in runs:
                if (i and mode not in repeated) or (args.no_naive and "naive" in mode):
                    continue
                if b.exists():
                    shutil.rmtree(b)
                warm(a)
                os.sync()
                results.setdefault(label, []).append(r := measure(mode, a, b))
                print(f"  ran {label:<20} {r['seconds']:7.1f} s", flush=True)
                if b != l4:
                    shutil.rmtree(b, ignore_errors=True)
        report(results, nbytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(all_runs: dict[str, list[dict]], nbytes: int) -> None:
    """The median run of each (by seconds; peak RSS: the largest of its runs)."""
    results, fastest = {}, {}
    for label, runs in all_runs.items():
        runs = sorted(runs, key=lambda r: r["seconds"])
        results[label] = {**runs[len(runs) // 2], "peak_rss": max(r["peak_rss"] for r in runs)}
        fastest[label] = runs[0]["seconds"]
        if len(runs) > 1:
            rates = [nbytes / 1e6 / r["seconds"] for r in runs]
            print(f"  {label}: {len(runs)} runs, {min(rates):.0f}-{max(rates):.0f} MB/s")
    copy = results["copy (+fsync)"]["seconds"]
    print(
        f"\n{'run':<20} {'seconds':>8} {'cpu s':>6} {'process':>8} {'MB/s':>7} "
        f"{'peak RSS':>10} {'RSS/ckpt':>9} {'copy time / time':>17}"
    )
    for label, r in results.items():
        if label == "imports only":
            print(
                f"{label:<20} {'':>8} {'':>6} {r['wall']:8.1f} {'':>7} "
                f"{r['peak_rss'] / 1e6:7.0f} MB {r['peak_rss'] / nbytes:8.1%}"
            )
            continue
        print(
            f"{label:<20} {r['seconds']:8.1f} {r['cpu']:6.1f} {r['wall']:8.1f} "
            f"{nbytes / 1e6 / r['seconds']:7.0f} {r['peak_rss'] / 1e6:7.0f} MB "
            f"{r['peak_rss'] / nbytes:8.1%} {copy / r['seconds']:16.2f}x"
        )
    print()
    for direction in ("hf -> l4jax", "l4jax -> hf"):
        stream, naive = results[direction], results.get(f"{direction}, naive")
        vs_naive = (
            f", {naive['peak_rss'] / stream['peak_rss']:.1f}x less RSS and "
            f"{naive['seconds'] / stream['seconds']:.2f}x the speed of naive"
            if naive
            else ""
        )
        print(
            f"{direction}: streaming peak RSS {stream['peak_rss'] / nbytes:.1%} of the checkpoint "
            f"(target < 25%), throughput {copy / stream['seconds']:.2f}x of the copy's "
            f"(target >= 0.5x; median runs), {fastest['copy (+fsync)'] / stream['seconds']:.2f}x "
            f"of the fastest copy's{vs_naive}"
        )
    for label in (label for label in results if label.startswith("hf -> l4jax ")):
        r = results[label]
        print(
            f"{label} (quantizing): streaming peak RSS {r['peak_rss'] / nbytes:.1%} of the bf16 "
            f"checkpoint (target < 25%), throughput {copy / r['seconds']:.2f}x of the copy's"
        )


if __name__ == "__main__":
    main()
