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
    python benchmarks/long_context.py --config scoutish --mode prefill --lengths 16384 \
        --torch --warm
    python benchmarks/long_context.py --config vocab --mode prefill --new-tokens 4 --lengths 32768

Both sides load one Hugging Face checkpoint of random weights (made once per run), and the table
prints the largest logit difference and whether the new tokens agree, with the 1-minute load
average before and after each run (the machine may be shared).

`--cp` instead reports per-device memory of context-parallel prefill on 8 simulated CPU devices
from XLA's compiled memory analysis (nothing runs; arguments + temporaries per device): the
model's last-logits forward with the sequence over `sequence=8` (ring attention on NoPE
layers, chunk-local + halo on chunked ones) against one device, and one NoPE layer's attention
alone with ring vs all-gather K/V exchange (`l4jax.context_parallel`):

    python benchmarks/long_context.py --cp --lengths 16384 65536

`--attention` times one causal attention layer alone (Scout-shaped small heads: 8 query / 2 kv
heads of 64, B=1), forward and forward + backward (gradient of sum(out^2) wrt q, k, v), the
blockwise backend against the einsum (`xla`) path, in this process, median of `--runs` calls
after one compiling call, the backends interleaved:

    python benchmarks/long_context.py --attention --lengths 4096 8192 --runs 5

`--kv-cache-dtypes` runs l4jax's prefill + decode once per KV cache dtype (each in its own
child process), the first dtype the baseline: the cache's bytes (`kv_cache.cache_bytes`),
the process peak, the largest difference of the first new token's logits (prompts longer
than one attention chunk: the prefill pieces after the first read the cache) and how many
greedy tokens agree before the first that differs (an int8 cache takes about half of
bfloat16's bytes; the logits move by its rounding; a random model has near-ties):

    python benchmarks/long_context.py --config scoutish --mode prefill --lengths 16384 65536 \
        --new-tokens 16 --kv-cache-dtypes float32 bfloat16 int8

`--cp-balance` computes (nothing runs) the causal ring's load per shard and step for one
global layer, contiguous vs zig-zag order (`l4jax.context_parallel.ring_work`: the blockwise
block plan's own count of (query block, key block) pairs): each step lasts as long as its
busiest shard, so the critical path is the per-step maximum, summed:

    python benchmarks/long_context.py --cp-balance --lengths 65536 1048576 --shards 4 8 16
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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
    if args.save:  # the shared random weights, as a Hugging Face checkpoint
        from l4jax.torch_ref import build_hf_model

        build_hf_model(config.to_hf_dict(), seed=0).save_pretrained(args.save)
        return {}
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.length))
    if args.analysis:
        return l4jax_analysis(config, tokens)
    run = l4jax_run if args.side == "l4jax" else torch_run
    if args.kv_cache_dtype and args.side == "l4jax":
        run = functools.partial(l4jax_run, kv_cache_dtype=args.kv_cache_dtype)
    result = run(args.weights, tokens, args.mode, args.new_tokens)
    if args.warm:  # the same call again: compiled (l4jax), allocator warm (both)
        again = run(args.weights, tokens, args.mode, args.new_tokens)
        result = dict(again, first_s=result["seconds"], compile_s=result.get("compile_s"))
    return result


def l4jax_analysis(config, tokens) -> dict:
    """XLA's own accounting of the compiled forward; nothing executes."""
    import jax
    import jax.numpy as jnp

    from l4jax import Llama4ForCausalLM, init_params

    model, params = Llama4ForCausalLM(config), init_params(config, rng=0)
    start = time.perf_counter()
    apply = jax.jit(model.apply).lower({"params": params}, jnp.asarray(tokens, jnp.int32))
    mem = apply.compile().memory_analysis()
    return dict(
        compile_s=time.perf_counter() - start,
        temp_gb=mem.temp_size_in_bytes / 1e9,
        argument_gb=mem.argument_size_in_bytes / 1e9,
        output_gb=mem.output_size_in_bytes / 1e9,
    )


def l4jax_run(weights: str, tokens, mode: str, new_tokens: int, kv_cache_dtype=None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import l4jax

    model, params = l4jax.from_pretrained(weights, dtype="float32")
    if mode == "forward":  # compiled ahead of time, so one timed execution suffices
        tokens = jnp.asarray(tokens, jnp.int32)
        start = time.perf_counter()
        apply = jax.jit(model.apply).lower({"params": params}, tokens).compile()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        out = np.asarray(apply({"params": params}, tokens)[0, -1])
        seconds = time.perf_counter() - start
        return dict(seconds=seconds, compile_s=compile_s, logits=out.tolist())
    start = time.perf_counter()  # prefill: one `generate` call, compilation included
    ids, logits = l4jax.generate(
        model, params, np.asarray(tokens), new_tokens, stop_ids=(), return_logits=True,
        kv_cache_dtype=kv_cache_dtype,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    new = ids[0, tokens.shape[1] :].tolist()
    return dict(seconds=seconds, tokens=new, logits=np.asarray(logits[0, 0]).tolist())


def torch_run(weights: str, tokens, mode: str, new_tokens: int) -> dict:
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(2)
    hf = transformers.Llama4ForCausalLM.from_pretrained(
        weights, torch_dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    ids = torch.from_numpy(tokens.astype(np.int64))
    start = time.perf_counter()
    with torch.no_grad():
        if mode == "forward":
            out = hf(input_ids=ids, use_cache=False).logits[0, -1]
            return dict(seconds=time.perf_counter() - start, logits=out.numpy().tolist())
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    seconds = time.perf_counter() - start
    new = out.sequences[0, ids.shape[1] :].tolist()
    return dict(seconds=seconds, tokens=new, logits=out.logits[0][0].float().numpy().tolist())


def measure(
    config: str, mode: str, side: str, length: int, timeout: float, extra: list | None = None
) -> dict:
    """One child run; adds the 1-minute load average before and after (shared machine)."""
    cmd = [sys.executable, __file__, "--child", "--config", config, "--mode", mode]
    cmd += ["--side", side, "--lengths", str(length), *(extra or [])]
    if "--analysis" not in cmd:
        cmd += ["--weights", weights_dir(config, timeout)]
    load = os.getloadavg()[0]
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
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(result, load=f"{load:.1f}-{os.getloadavg()[0]:.1f}")


_WEIGHTS: dict[str, str] = {}


def weights_dir(config: str, timeout: float) -> str:
    """A temporary Hugging Face checkpoint of `config`'s random weights (made once, in a child
    with torch), which both sides load: same weights on both sides."""
    if config not in _WEIGHTS:
        path = tempfile.mkdtemp(prefix=f"l4jax-bench-{config}-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        cmd = [sys.executable, __file__, "--child", "--config", config, "--save", path]
        subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)
        _WEIGHTS[config] = path
    return _WEIGHTS[config]


CP_CONFIG = dict(attention_chunk_size=2048, floor_scale=8192, max_position_embeddings=2**20)


def cp_memory(lengths: list[int]) -> None:
    """Per-device bytes (arguments + temporaries) of compiled prefill, 8 simulated devices."""
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

    def identity(f):
        return f

    def grad_of_sum(f):  # -> the gradient of sum(f(q, k, v)) wrt q, k and v
        return jax.grad(lambda *qkv: jnp.sum(f(*qkv)), argnums=(0, 1, 2))

    def prefill(params, tokens):
        return model.apply({"params": params}, tokens, method="forward", output="last_logits")[0]

    print(f"config tiny, chunk {config.attention_chunk_size}, batch 1, float32, 8 CPU devices")
    print("| tokens | prefill 1 device MiB | prefill sequence=8 MiB/device | NoPE attention "
          "1 device MiB | ring MiB/device | all-gather MiB/device | its gradient 1 device MiB "
          "| ring MiB/device | all-gather MiB/device |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
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
        spec = NamedSharding(mesh, PartitionSpec(None, "sequence"))
        sharded = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=spec) for x in qkv]
        for with_grad in (identity, grad_of_sum):  # the attention, then its gradient
            fn = with_grad(lambda q, k, v, mask=mask: attention("auto", q, k, v, mask)[0])
            row.append(mib(jax.jit(fn).lower(*qkv).compile()))
            for exchange in ("ring", "all_gather"):
                cp_attn = ContextParallel(mesh.abstract_mesh, ("sequence",), exchange=exchange)
                fn = with_grad(
                    lambda q, k, v, cp_attn=cp_attn, pos=pos, seg=seg: cp_attn.self_attention(
                        "auto", q, k, v, pos, seg, None
                    )
                )
                with mesh_context(mesh):
                    row.append(mib(jax.jit(fn).lower(*sharded).compile()))
        print("| " + " | ".join(row) + " |", flush=True)


def attention_speed(lengths: list[int], runs: int) -> None:
    """Forward and forward + backward seconds of one causal layer: blockwise vs xla."""
    import jax
    import jax.numpy as jnp

    from l4jax.attention import attention, self_mask

    print("one causal attention layer, 8 heads / 2 kv heads of 64, batch 1, float32, CPU;")
    print(f"median of {runs} calls after compiling")
    print("| tokens | blockwise fwd s | blockwise fwd+bwd s | xla fwd s | xla fwd+bwd s "
          "| xla / blockwise, fwd+bwd |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for t in lengths:
        q, k, v = (jnp.asarray(rng.standard_normal((1, t, m, 64)), jnp.float32) for m in (8, 2, 2))
        pos = jnp.arange(t, dtype=jnp.int32)[None]
        mask = self_mask(pos, jnp.ones_like(pos), None)
        calls = {}
        for impl in ("blockwise", "xla"):

            def loss(q, k, v, impl=impl, mask=mask):
                return jnp.sum(attention(impl, q, k, v, mask)[0] ** 2)

            calls[impl, "fwd"] = jax.jit(loss)
            calls[impl, "fwd+bwd"] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        times = {key: [] for key in calls}
        for fn in calls.values():  # compile
            jax.block_until_ready(fn(q, k, v))
        for _ in range(runs):
            for key, fn in calls.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(q, k, v))
                times[key].append(time.perf_counter() - start)
        med = {key: float(np.median(ts)) for key, ts in times.items()}
        cells = [med[i, p] for i in ("blockwise", "xla") for p in ("fwd", "fwd+bwd")]
        ratio = med["xla", "fwd+bwd"] / med["blockwise", "fwd+bwd"]
        print(f"| {t} | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {ratio:.2f}x |")


def cp_balance(lengths: list[int], shard_counts: list[int]) -> None:
    from l4jax.config import CONTEXT_PARALLEL_LAYOUTS
    from l4jax.context_parallel import ring_work

    print("one causal global layer, one document; work in (128 x 512) block pairs")
    print(
        "| tokens | shards | total work | contiguous critical path | zig-zag critical path "
        "| zig-zag / contiguous | ideal (total / shards) |"
    )
    print("|---|---|---|---|---|---|---|")
    for t in lengths:
        for n in shard_counts:
            work = {layout: ring_work(t, n, layout) for layout in CONTEXT_PARALLEL_LAYOUTS}
            path = {k: int(w.max(axis=1).sum()) for k, w in work.items()}
            total = int(work["contiguous"].sum())
            ratio = path["zigzag"] / path["contiguous"]
            cells = [t, n, total, path["contiguous"], path["zigzag"], f"{ratio:.3f}"]
            print("| " + " | ".join(map(str, cells)) + f" | {total / n:.0f} |", flush=True)


def kv_cache_dtypes(args: argparse.Namespace, extra: list[str]) -> None:
    """`--kv-cache-dtypes`: one l4jax prefill + decode per cache dtype and length, each row
    against the first dtype's: the first new token's logits (the prefill pieces after the
    first read the cache) and how many greedy tokens agree before the first that differs."""
    from l4jax.config import preset
    from l4jax.kv_cache import cache_bytes

    config = preset("tiny", **CONFIGS[args.config])
    base = args.kv_cache_dtypes[0]
    timing = "second call (first call in brackets)" if args.warm else "one call, compile included"
    print(f"config {args.config}, prefill + {args.new_tokens} new tokens, batch 1, float32 "
          f"compute, CPU; generate seconds: {timing}; each dtype against {base}")  # fmt: skip
    print("| tokens | KV cache | cache MB | cache / first | generate s | peak GB | load | "
          "first new token's logits: max abs diff | greedy tokens equal until |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        first = None
        for dtype in args.kv_cache_dtypes:
            cmd = [*extra, "--kv-cache-dtype", dtype]
            r = measure(args.config, "prefill", "l4jax", length, args.timeout, cmd)
            nbytes = cache_bytes(config, length + args.new_tokens - 1, dtype=dtype)
            first = first or dict(r, nbytes=nbytes)
            if "error" in r or "error" in first:
                print(f"| {length} | {dtype} | {r.get('error', first.get('error'))} |", flush=True)
                continue
            secs = f"{r['seconds']:.2f}" + (f" ({r['first_s']:.2f})" if "first_s" in r else "")
            diff = np.max(np.abs(np.subtract(r["logits"], first["logits"])))
            agree = np.cumprod(np.equal(r["tokens"], first["tokens"])).sum()
            cells = [
                str(length), dtype, f"{nbytes / 2**20:.1f}", f"{nbytes / first['nbytes']:.3f}",
                secs, f"{r['peak_gb']:.2f}", r["load"],
                f"{diff:.2e} (logits up to {np.max(np.abs(first['logits'])):.1f})",
                f"{agree} of {len(first['tokens'])}",
            ]  # fmt: skip
            print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--mode", choices=("forward", "prefill"), default="forward")
    parser.add_argument("--lengths", nargs="+", type=int, default=[8192, 16384, 32768, 65536])
    parser.add_argument(
        "--torch", action="store_true", help="also run transformers (sdpa) at each length"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=1, help="prefill: tokens to generate (greedy)"
    )
    parser.add_argument(
        "--warm",
        action="store_true",
        help="time a second identical call in the same process (l4jax: compiled; both: "
        "allocator warm); the first call's time is printed too",
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
    parser.add_argument(
        "--attention",
        action="store_true",
        help="time one causal attention layer, forward and backward: blockwise vs xla",
    )
    parser.add_argument("--runs", type=int, default=3, help="--attention: timed calls each")
    parser.add_argument(
        "--cp-balance",
        action="store_true",
        help="computed ring load per shard: contiguous vs zig-zag order",
    )
    parser.add_argument(
        "--shards", nargs="+", type=int, default=[4, 8, 16], help="--cp-balance: ring sizes"
    )
    parser.add_argument(
        "--kv-cache-dtypes",
        nargs="+",
        metavar="DTYPE",
        help="prefill: l4jax only, once per KV cache dtype (float32, bfloat16, int8), each "
        "against the first: cache bytes, peak memory, logits and tokens",
    )
    parser.add_argument("--kv-cache-dtype", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", default="l4jax", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cp:
        cp_memory(args.lengths)
        return
    if args.attention:
        attention_speed(args.lengths, args.runs)
        return
    if args.cp_balance:
        cp_balance(args.lengths, args.shards)
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
    extra = ["--new-tokens", str(args.new_tokens)] + (["--warm"] if args.warm else [])
    if args.kv_cache_dtypes:
        kv_cache_dtypes(args, extra)
        return
    what = f"{args.mode}" + (f", {args.new_tokens} new tokens" if args.mode == "prefill" else "")
    timing = "second call (first call in brackets)" if args.warm else "one call"
    print(f"config {args.config}, {what}, batch 1, float32, CPU; seconds: {timing}")
    print(
        "| tokens | l4jax s | l4jax peak GB | load | transformers s | transformers peak GB "
        "| load | transformers / l4jax | logits max abs diff | same tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        sides = [measure(args.config, args.mode, "l4jax", length, args.timeout, extra)]
        if args.torch:
            sides.append(measure(args.config, args.mode, "torch", length, args.timeout, extra))
        row = [str(length)]
        for r in sides:
            if "error" in r:
                row += [r["error"], "", r["load"] if "load" in r else ""]
                continue
            first = f" ({r['first_s']:.2f})" if "first_s" in r else ""
            row += [f"{r['seconds']:.2f}{first}", f"{r['peak_gb']:.2f}", r["load"]]
        row += [""] * (1 + 3 * 2 - len(row))
        if len(sides) == 2 and all("seconds" in r for r in sides):
            ours, theirs = sides
            row.append(f"{theirs['seconds'] / ours['seconds']:.2f}x")
            diff = np.max(np.abs(np.subtract(ours["logits"], theirs["logits"])))
            row.append(f"{diff:.2e} (logits up to {np.max(np.abs(theirs['logits'])):.1f})")
            row.append(str(ours.get("tokens") == theirs.get("tokens")) if "tokens" in ours else "")
        else:
            row += ["", "", ""]
        if "tokens" in sides[0]:
            row[-1] = f"{row[-1]} {sides[0]['tokens']}".strip()
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
