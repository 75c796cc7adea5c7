"""MoE throughput on CPU: l4jax's forward pass vs Hugging Face transformers', and MoE scaling.

    python benchmarks/moe.py                                   # everything, batch 4 x 1024
    python benchmarks/moe.py --part model --configs moe16      # l4jax vs HF on moe16 only
    python benchmarks/moe.py --part layer --experts 8 128      # MoE layer scaling only
    python benchmarks/moe.py --part layer --backends           # + per-backend routed-term table

Part `model`: for each config (`moe16`, `moe128`, float32), a random HF `Llama4ForCausalLM` is
built from `config.to_hf_dict()`, saved, and loaded into l4jax with `from_pretrained`, so both
sides hold the same weights; both run a forward pass over the same [batch, seq] tokens (l4jax
jitted, compile excluded; HF in `torch.no_grad`, sdpa attention), the logits are compared
(rel_err) and tokens/s and the ratio are printed. HF runs every expert on every token; l4jax
only the routed ones (`moe_impl="ragged_dot"`, on CPU the chunked grouped matmul).

Part `layer`: one MoE layer (router, dropless dispatch, shared expert) of the benchmark shape
(hidden 512, expert hidden 1024, top-1: fixed active parameters) on batch*seq tokens, as the
number of experts grows; prints the time relative to the smallest expert count. With
`--backends` it also times the routed term alone with each grouped matmul: the chunked loop
(l4jax's CPU path), XLA's own `jax.lax.ragged_dot` (a dense masked matmul per expert on CPU)
and the dense oracle (every expert on every token, as HF).

Timings are the best of `--runs` runs after one warm-up run (HF: of `--hf-runs`, no warm-up).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from l4jax import moe, preset  # noqa: E402

log = logging.getLogger("benchmarks.moe")


def best_seconds(fn: Callable[[], Any], runs: int, warmup: bool = True) -> float:
    """Shortest wall time of `fn()` over `runs` runs (after one untimed warm-up run): on a
    shared machine the minimum is the least disturbed estimate of the uncontended time."""
    if warmup:
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# ---- part 1: whole model, l4jax vs transformers ---------------------------------------------


def bench_model(name: str, batch: int, seq: int, runs: int, hf_runs: int) -> dict[str, float]:
    import torch

    import l4jax
    from l4jax.torch_ref import build_hf_model, hf_logits, rel_err

    config = preset(name)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq))
    log.info("%s: building the HF model (%d experts) and saving it", name, config.num_local_experts)
    hf_model = build_hf_model(config.to_hf_dict(), seed=0)
    hf_model.set_attn_implementation("sdpa")
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        model, params = l4jax.from_pretrained(tmp, moe_impl="ragged_dot")

    apply = jax.jit(model.apply)
    tokens_j = jnp.asarray(tokens, jnp.int32)
    log.info("%s: compiling and timing l4jax (%d runs)", name, runs)
    start = time.perf_counter()
    logits = np.asarray(apply({"params": params}, tokens_j))
    first_s = time.perf_counter() - start
    l4_s = best_seconds(lambda: apply({"params": params}, tokens_j).block_until_ready(), runs)

    threads = torch.get_num_threads()
    log.info("%s: timing transformers (%d runs, %d threads)", name, hf_runs, threads)
    hf_out: list[np.ndarray] = []
    # no warm-up run: one HF forward is long, and eager PyTorch has no compile step to exclude
    hf_s = best_seconds(lambda: hf_out.append(hf_logits(hf_model, tokens)), hf_runs, False)
    err = rel_err(logits, hf_out[-1])
    n = batch * seq
    return {"l4jax_s": l4_s, "first_call_s": first_s, "hf_s": hf_s, "tok_s": n / l4_s,
            "hf_tok_s": n / hf_s, "ratio": hf_s / l4_s, "rel_err": err}  # fmt: skip


# ---- part 2: the MoE layer as experts grow ----------------------------------------------------


def _layer_inputs(num_experts: int, tokens: int, seed: int = 0):
    import flax.linen as nn

    from l4jax.model import MoE

    config = preset("moe16", num_local_experts=num_experts)
    x_td = jax.random.normal(jax.random.key(seed), (tokens, config.hidden_size), jnp.float32)
    module = MoE(config)
    params = nn.unbox(jax.jit(lambda x: module.init(jax.random.key(seed + 1), x))(x_td[None, :8]))
    return config, module, params, x_td


def bench_layers(expert_counts: list[int], tokens: int, runs: int) -> dict[int, float]:
    """Seconds per forward pass of the whole MoE layer (router, routed experts, shared expert)
    for each expert count. The layers are timed in interleaved rounds, so that load changes on
    a shared machine hit every expert count alike; best round per count."""
    calls = {}
    for e in expert_counts:
        log.info("MoE layer, %d experts: compiling", e)
        _, module, params, x_td = _layer_inputs(e, tokens)
        apply = jax.jit(module.apply)
        calls[e] = lambda apply=apply, params=params, x=x_td[None]: apply(params, x)
        calls[e]().block_until_ready()  # compile + warm-up
    best = {e: float("inf") for e in expert_counts}
    for _ in range(runs):
        for e, call in calls.items():
            best[e] = min(best[e], best_seconds(lambda call=call: call().block_until_ready(), 1,
                                                warmup=False))  # fmt: skip
    return best


def _ops() -> dict[str, moe.GroupedOps | None]:
    from l4jax.kernels.chunked_gmm import chunked_gmm

    def ragged_dot(lhs, rhs, group_sizes):
        return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=lhs.dtype)

    return {
        "chunked": moe.GroupedOps(chunked_gmm, moe.unfused_swiglu(chunked_gmm)),
        "lax.ragged_dot": moe.GroupedOps(ragged_dot, moe.unfused_swiglu(ragged_dot)),
        "dense": None,
    }


def bench_routed(num_experts: int, tokens: int, runs: int) -> dict[str, float]:
    """Seconds per routed term (sort, 3 grouped matmuls, unsort) with each grouped matmul."""
    config, _, params, x_td = _layer_inputs(num_experts, tokens)
    p = params["params"]
    w = moe.ExpertWeights(p["gate_proj"], p["up_proj"], p["down_proj"])
    routing = moe.route(x_td, p["router"], config.num_experts_per_tok)
    args = (x_td, routing.expert_ids_tk, routing.scores_tk, w)
    out = {}
    for name, ops in _ops().items():
        if ops is None:
            fn = jax.jit(moe.dense_experts)
        else:
            fn = jax.jit(lambda x, ids, s, w, ops=ops: moe.sorted_experts(x, ids, s, w, ops))
        log.info("routed term, %d experts: %s", num_experts, name)
        out[name] = best_seconds(lambda fn=fn: fn(*args).block_until_ready(), runs)
    return out


# ---- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["all", "model", "layer"], default="all")
    parser.add_argument("--configs", nargs="+", default=["moe16", "moe128"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5, help="timed runs (best of)")
    parser.add_argument("--hf-runs", type=int, default=1, help="timed HF runs (best of)")
    parser.add_argument("--experts", nargs="+", type=int, default=[8, 16, 32, 64, 128])
    parser.add_argument("--backends", action="store_true", help="also time each grouped matmul")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    n = args.batch * args.seq
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, float32, {n} tokens/batch")

    if args.part in ("all", "model"):
        print(f"\n## forward pass, batch {args.batch} x {args.seq} tokens")
        print("| config | l4jax s | l4jax tok/s | HF s | HF tok/s | speedup | rel_err logits |")
        print("|---|---|---|---|---|---|---|")
        for name in args.configs:
            r = bench_model(name, args.batch, args.seq, args.runs, args.hf_runs)
            row = (name, f"{r['l4jax_s']:.2f}", f"{r['tok_s']:.0f}", f"{r['hf_s']:.2f}",
                   f"{r['hf_tok_s']:.0f}", f"{r['ratio']:.1f}x", f"{r['rel_err']:.1e}")  # fmt: skip
            print("| " + " | ".join(row) + " |", flush=True)

    if args.part in ("all", "layer"):
        print(f"\n## MoE layer (hidden 512, expert hidden 1024, top-1), {n} tokens")
        print("| experts | layer ms | vs first |")
        print("|---|---|---|")
        times = bench_layers(args.experts, n, args.runs)
        for e, s in times.items():
            print(f"| {e} | {s * 1e3:.0f} | {s / times[args.experts[0]]:.2f}x |", flush=True)
        if args.backends:
            names = list(_ops())
            print(f"\n## routed term by grouped matmul (ms), {n} tokens")
            print("| experts | " + " | ".join(names) + " |")
            print("|---|" + "---|" * len(names))
            for e in args.experts:
                r = bench_routed(e, n, args.runs)
                print(
                    f"| {e} | " + " | ".join(f"{r[k] * 1e3:.0f}" for k in names) + " |", flush=True
                )


if __name__ == "__main__":
    main()
