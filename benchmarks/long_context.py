"""Long context on CPU: forward and prefill time and peak memory by length, l4jax vs transformers.

Every measurement runs in a fresh child process (this script with `--child`), which reports its
wall time (l4jax forward: one execution of the ahead-of-time compiled function, compile time
apart; l4jax prefill: one `generate` call, compilation included; transformers: one call) and
its peak resident memory (`ru_maxrss`, the whole process: Python, JAX/PyTorch runtimes,
weights and activations), so lengths and sides do not share allocator state.

    forward   l4jax: `apply` on B=1 x T tokens, logits of every position ([T, V] fp32 out);
              transformers (sdpa): `model(ids, use_cache=False)`
    prefill   l4jax: `generate(max_new_tokens=1)`: chunked prefill (pieces of the attention
              chunk), KV cache for T + 1 tokens, logits of the last position only;
              transformers (sdpa): `generate(max_new_tokens=1)`

Configs (random weights, float32; chunk and floor_scale as Scout unless said):
    tiny      the `tiny` preset (4 layers, 3 chunked RoPE : 1 NoPE, width 64, vocab 512),
              with Scout's attention chunk 8192 and floor_scale 8192
    vocab     `tiny` with Llama 4's real vocabulary (202048)
    scoutish  Scout-shaped small: 4 layers (3 chunked : 1 global), width 256, 8 heads / 2 kv
              heads of 64, 4 experts, chunk 8192, floor_scale 8192, vocab 512

    python benchmarks/long_context.py --config tiny --mode forward --lengths 8192 16384 32768 65536
    python benchmarks/long_context.py --config scoutish --mode prefill --lengths 16384 --torch

`--cp` instead reports per-device memory of context-parallel prefill on 8 simulated CPU devices
from XLA's compiled memory analysis (nothing runs; arguments + temporaries per device): the
model's last-logits forward with the sequence over `sequence=8` (ring attention on NoPE
layers, chunk-local + halo on chunked ones) against one device, and one NoPE layer's attention
alone with ring vs all-gather K/V exchange (`l4jax.context_parallel`):

    python benchmarks/long_context.py --cp --lengths 16384 65536
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "tiny": dict(attention_chunk_size=8192, floor_scale=8192, max_position_embeddings=2**20),
    "vocab": dict(
        attention_chunk_size=8192,
        floor_scale=8192,
        max_position_embeddings=2**20,
        vocab_size=202048,
    ),
    "scoutish": dict(
        hidden_size=256,
        intermediate_size=512,
        intermediate_size_mlp=1024,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        num_local_experts=4,
        interleave_moe_layer_step=1,
        attention_chunk_size=8192,
        floor_scale=8192,
        max_position_embeddings=2**20,
    ),
}


def child(args: argparse.Namespace) -> dict:
    import numpy as np

    from l4jax.config import preset

    config = preset("tiny", **CONFIGS[args.config])
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.length))
    if args.side == "l4jax":
        return l4jax_run(config, tokens, args.mode, args.analysis)
    return torch_run(config, tokens, args.mode)


def l4jax_run(config, tokens, mode: str, analysis: bool = False) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import l4jax
    from l4jax import Llama4ForCausalLM, init_params

    model = Llama4ForCausalLM(config)
    params = init_params(config, rng=0)
    tokens = jnp.asarray(tokens, jnp.int32)
    if mode == "forward":  # compiled ahead of time, so one timed execution suffices
        start = time.perf_counter()
        apply = jax.jit(model.apply).lower({"params": params}, tokens).compile()
        compile_s = time.perf_counter() - start
        if analysis:  # XLA's own accounting of the compiled forward; nothing executes
            mem = apply.memory_analysis()
            sizes = dict(
                temp_gb=mem.temp_size_in_bytes / 1e9,
                argument_gb=mem.argument_size_in_bytes / 1e9,
                output_gb=mem.output_size_in_bytes / 1e9,
            )
            return dict(compile_s=compile_s, **sizes)
        start = time.perf_counter()
        out = np.asarray(apply({"params": params}, tokens)[0, -1])
        seconds = time.perf_counter() - start
        return dict(seconds=seconds, compile_s=compile_s, result=out.tolist())
    start = time.perf_counter()  # prefill: one run, compilation included
    ids = l4jax.generate(model, params, np.asarray(tokens), 1, stop_ids=())
    seconds = time.perf_counter() - start
    return dict(seconds=seconds, compile_s=None, result=int(ids[0, -1]))


def torch_run(config, tokens, mode: str) -> dict:
    import numpy as np
    import torch

    from l4jax.torch_ref import build_hf_model

    torch.set_num_threads(2)
    hf = build_hf_model(config.to_hf_dict(), seed=0)
    hf.config._attn_implementation = "sdpa"
    ids = torch.from_numpy(tokens.astype(np.int64))
    start = time.perf_counter()
    with torch.no_grad():
        if mode == "forward":
            out = hf(input_ids=ids, use_cache=False).logits[0, -1].numpy().tolist()
        else:
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=1,
                do_sample=False,
                pad_token_id=0,
            )[0, -1].item()
    return dict(seconds=time.perf_counter() - start, result=out)


def measure(
    config: str, mode: str, side: str, length: int, timeout: float, extra: list | None = None
) -> dict:
    cmd = [sys.executable, __file__, "--child", "--config", config, "--mode", mode]
    cmd += ["--side", side, "--lengths", str(length), *(extra or [])]
    with tempfile.TemporaryFile("w+") as err:
        try:
            proc = subprocess.run(
                cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return dict(error=f"timed out after {timeout:.0f} s")
        if proc.returncode != 0:
            err.seek(0)
            lines = err.read().strip().splitlines()
            return dict(error=lines[-1] if lines else f"exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


CP_CONFIG = dict(attention_chunk_size=2048, floor_scale=8192, max_position_embeddings=2**20)


def cp_memory(lengths: list[int]) -> None:
    """Per-device bytes (arguments + temporaries) of compiled prefill, 8 simulated devices."""
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8"
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from l4jax.attention import attention, self_mask
    from l4jax.config import preset
    from l4jax.context_parallel import ContextParallel
    from l4jax.model import Llama4ForCausalLM, init_params
    from sharding import make_mesh
    from sharding.rules import mesh_context

    config = preset("tiny", **CP_CONFIG)
    model, params = Llama4ForCausalLM(config), init_params(config, 0)

    def mib(compiled) -> str:
        m = compiled.memory_analysis()
        return f"{(m.argument_size_in_bytes + m.temp_size_in_bytes) / 2**20:.1f}"

    def prefill(params, tokens):
        return model.apply({"params": params}, tokens, method="forward", output="last_logits")[0]

    print(f"config tiny, chunk {config.attention_chunk_size}, batch 1, float32, 8 CPU devices")
    print("| tokens | prefill 1 device MiB | prefill sequence=8 MiB/device | NoPE attention "
          "1 device MiB | ring MiB/device | all-gather MiB/device |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    mesh = make_mesh("sequence=8")
    n, k, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    for t in lengths:
        tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
        one = jax.jit(prefill).lower(params, tokens).compile()
        with mesh_context(mesh):
            split = NamedSharding(mesh, PartitionSpec(None, "sequence"))
            tokens_cp = jax.ShapeDtypeStruct((1, t), jnp.int32, sharding=split)
            cp = jax.jit(prefill).lower(params, tokens_cp).compile()
        pos = jnp.arange(t, dtype=jnp.int32)[None]
        seg = jnp.ones_like(pos)
        qkv = [jax.ShapeDtypeStruct((1, t, m, h), jnp.float32) for m in (n, k, k)]
        row = [str(t), mib(one), mib(cp)]
        mask = self_mask(pos, seg, None)
        fn = jax.jit(lambda q, k, v, mask=mask: attention("auto", q, k, v, mask))
        row.append(mib(fn.lower(*qkv).compile()))
        for exchange in ("ring", "all_gather"):
            cp_attn = ContextParallel(mesh.abstract_mesh, ("sequence",), exchange=exchange)
            spec = NamedSharding(mesh, PartitionSpec(None, "sequence"))
            sharded = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=spec) for x in qkv]
            with mesh_context(mesh):
                fn = jax.jit(
                    lambda q, k, v, cp_attn=cp_attn, pos=pos, seg=seg: cp_attn.self_attention(
                        "auto", q, k, v, pos, seg, None
                    )
                )
                row.append(mib(fn.lower(*sharded).compile()))
        print("| " + " | ".join(row) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--mode", choices=("forward", "prefill"), default="forward")
    parser.add_argument("--lengths", nargs="+", type=int, default=[8192, 16384, 32768, 65536])
    parser.add_argument(
        "--torch", action="store_true", help="also run transformers (sdpa) at each length"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child run")
    parser.add_argument(
        "--analysis",
        action="store_true",
        help="forward only: compile and print XLA's memory analysis (temp, arguments, output) "
        "per length instead of running",
    )
    parser.add_argument(
        "--cp", action="store_true", help="per-device memory of context-parallel prefill"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", default="l4jax", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cp:
        cp_memory(args.lengths)
        return
    if args.child:
        args.length = args.lengths[0]
        result = child(args)
        result["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(result))
        return
    if args.analysis:
        print(f"config {args.config}, forward, compiled memory analysis (GB), batch 1, float32")
        print("| tokens | temp | arguments | output | compile s | process peak GB |")
        print("|---|---|---|---|---|---|")
        for length in args.lengths:
            r = measure(args.config, "forward", "l4jax", length, args.timeout, ["--analysis"])
            if "error" in r:
                print(f"| {length} | {r['error']} | | | | |", flush=True)
                continue
            cells = [r["temp_gb"], r["argument_gb"], r["output_gb"], r["compile_s"], r["peak_gb"]]
            print(f"| {length} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)
        return
    print(f"config {args.config}, {args.mode}, batch 1, float32, CPU")
    print("| tokens | l4jax s | l4jax peak GB | transformers s | transformers peak GB | ratio |")
    print("|---|---|---|---|---|---|")
    for length in args.lengths:
        ours = measure(args.config, args.mode, "l4jax", length, args.timeout)
        theirs = (
            measure(args.config, args.mode, "torch", length, args.timeout) if args.torch else {}
        )
        row = [str(length)]
        row += (
            [f"{ours['seconds']:.2f}", f"{ours['peak_gb']:.2f}"]
            if "seconds" in ours
            else [
                ours["error"],
                "",
            ]
        )
        if theirs:
            row += (
                [f"{theirs['seconds']:.2f}", f"{theirs['peak_gb']:.2f}"]
                if "seconds" in theirs
                else [theirs["error"], ""]
            )
            both = "seconds" in ours and "seconds" in theirs
            row.append(f"{theirs['seconds'] / ours['seconds']:.2f}x" if both else "")
            if both and args.mode == "prefill" and ours["result"] != theirs["result"]:
                row[-1] += " (first new token differs)"
        else:
            row += ["", "", ""]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
