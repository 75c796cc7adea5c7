"""MoE throughput on CPU: l4jax's forward pass vs Hugging Face transformers', and MoE scaling.

    python benchmarks/moe.py                                   # everything, batch 4 x 1024
    python benchmarks/moe.py --part model --configs moe16      # l4jax vs HF on moe16 only
    python benchmarks/moe.py --part layer --experts 8 128      # MoE layer scaling only
    python benchmarks/moe.py --part layer --backends           # + per-backend routed-term table
    python benchmarks/moe.py --part roofline                   # the TPU roofline table (no run)

Part `model`: for each config (`moe16`, `moe128`, float32), a random HF `Llama4ForCausalLM` is
built from `config.to_hf_dict()`, saved, and loaded into l4jax with `from_pretrained`, so both
sides hold the same weights; both run a forward pass over the same [batch, seq] tokens (l4jax
jitted, compile excluded; HF in `torch.no_grad`, sdpa attention), the logits are compared
(rel_err, and the share of tokens that agree to 1e-4: near-tied top-1 router logits can route
a token differently in the two fp32 implementations) and tokens/s and the ratio are printed.
HF runs every expert on every token; l4jax only the routed ones (`moe_impl="ragged_dot"`, on
CPU the chunked grouped matmul).

Part `layer`: one MoE layer (router, dropless dispatch, shared expert) of the benchmark shape
(hidden 512, expert hidden 1024, top-1: fixed active parameters) on batch*seq tokens, as the
number of experts grows; prints the time relative to the smallest expert count. With
`--backends` it also times the routed term alone with each grouped matmul: the chunked loop
(l4jax's CPU path), XLA's own `jax.lax.ragged_dot` (a dense masked matmul per expert on CPU)
and the dense oracle (every expert on every token, as HF).

Part `roofline`: no timing; the Pallas kernels' expected TPU v5e/v5p utilisation for Scout and
Maverick expert shapes, computed from their tile schedule (FLOPs issued, HBM bytes, grid steps):
on paper until measured on a TPU (benchmarks/README.md).

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
    ref = hf_out[-1]
    err = rel_err(logits, ref)
    # top-1 routing: a token whose two best router logits are within fp32 rounding (gaps of
    # ~1e-6 occur among 10^4-10^5 routing decisions) can go to different experts in the two
    # implementations, and attention spreads that to later tokens; count the tokens that agree
    token_err = np.abs(logits - ref).max(axis=-1) / np.abs(ref).max()
    agree = float(np.mean(token_err < 1e-4))
    n = batch * seq
    return {"l4jax_s": l4_s, "first_call_s": first_s, "hf_s": hf_s, "tok_s": n / l4_s,
            "hf_tok_s": n / hf_s, "ratio": hf_s / l4_s, "rel_err": err, "agree": agree}  # fmt: skip


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


# ---- part 3: the Pallas kernel's TPU roofline, on paper --------------------------------------

# bf16 peak FLOP/s and HBM bytes/s (public specs); the ~0.35 us fixed cost of a Pallas grid step
TPUS = {"v5e": (197e12, 819e9), "v5p": (459e12, 2765e9)}
STEP_S = 0.35e-6
# (name, hidden D, expert hidden F, local experts G, routed rows M on the device)
ROOFLINE_CASES = [
    ("Scout, FSDP (all 16 experts/device), 8k tokens/device", 5120, 8192, 16, 8192),
    ("Maverick, FSDP (all 128 experts/device), 8k tokens/device", 5120, 8192, 128, 8192),
    ("Scout, EP=16 (1 expert/device), 8k tokens/device", 5120, 8192, 1, 8192),
    ("Scout, EP=4 (4 experts/device), 8k tokens/device", 5120, 8192, 4, 8192),
    ("Maverick, EP=16 (8 experts/device), 8k tokens/device", 5120, 8192, 8, 8192),
    ("Maverick, EP=64 (2 experts/device), 8k tokens/device", 5120, 8192, 2, 8192),
    ("Maverick, EP=16, decode: 128 tokens/device", 5120, 8192, 8, 128),
    ("Scout, EP=16, decode: 64 tokens/device", 5120, 8192, 1, 64),
]


def gmm_cost(m: int, k: int, n: int, groups: int, tiling, num_rhs: int = 1, b: int = 2):
    """(useful FLOPs, issued MXU FLOPs, HBM bytes, grid steps) of one `gmm` / `gmm_swiglu`
    (num_rhs=2) forward call over m routed rows in `groups` equal groups, from the kernel's
    schedule: V = ceil(m/tm) + groups - 1 visits (each group boundary inside a row tile costs a
    second visit of that tile), grid (N tiles, V, K tiles); per visit and N tile the lhs tile
    [tm, K] and a weight strip [K, tn] per rhs are read; the output is written once."""
    tm, tk, tn = tiling
    kp, np_ = -(-k // tk) * tk, -(-n // tn) * tn
    visits = -(-m // tm) + groups - 1
    tiles_n, tiles_k = np_ // tn, kp // tk
    useful = 2 * m * k * n * num_rhs
    issued = 2 * visits * tm * kp * np_ * num_rhs
    hbm = b * (tiles_n * visits * tm * kp + num_rhs * visits * kp * np_ + m * n)
    return useful, issued, hbm, tiles_n * visits * tiles_k


def roofline_rows():
    """Per case, tiling and TPU: the expected MXU utilisation of the routed experts' forward
    (fused gate/up `gmm_swiglu` + down `gmm`): useful FLOPs / (peak x time), with
    time = max(issued FLOPs / peak, bytes / HBM bandwidth) + grid steps x 0.35 us."""
    for name, d, f, groups, m in ROOFLINE_CASES:
        for tiling in [(128, 128, 128), moe.pallas_tiling(m, d, f, groups)]:
            calls = [
                gmm_cost(m, d, f, groups, tiling, num_rhs=2),
                gmm_cost(m, f, d, groups, tiling),
            ]
            useful, issued, hbm, steps = (sum(c[i] for c in calls) for i in range(4))
            utils = {}
            for tpu, (peak, bw) in TPUS.items():
                seconds = max(issued / peak, hbm / bw) + steps * STEP_S
                utils[tpu] = (useful / (peak * seconds), seconds)
            yield name, m // groups, tiling, useful / hbm, issued / useful, steps, utils


def print_roofline() -> None:
    print("\n## Pallas MoE kernels on TPU, on paper (forward, bf16, top-1, D=5120, F=8192)")
    print("| case | rows/expert | tiles | useful FLOP/B | issued/useful | grid steps "
          "| v5e util (ms) | v5p util (ms) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, per_expert, tiling, intensity, waste, steps, utils in roofline_rows():
        cells = [f"{100 * u:.0f}% ({1e3 * t:.2f})" for u, t in utils.values()]
        tiles = "x".join(map(str, tiling))
        print(f"| {name} | {per_expert} | {tiles} | {intensity:.0f} | {waste:.2f} | {steps} | "
              + " | ".join(cells) + " |")  # fmt: skip


# ---- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["all", "model", "layer", "roofline"], default="all")
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
        print("| config | l4jax s | l4jax tok/s | HF s | HF tok/s | speedup | rel_err logits "
              "| tokens with rel_err < 1e-4 |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for name in args.configs:
            r = bench_model(name, args.batch, args.seq, args.runs, args.hf_runs)
            row = (name, f"{r['l4jax_s']:.2f}", f"{r['tok_s']:.0f}", f"{r['hf_s']:.2f}",
                   f"{r['hf_tok_s']:.0f}", f"{r['ratio']:.1f}x", f"{r['rel_err']:.1e}",
                   f"{100 * r['agree']:.2f}%")  # fmt: skip
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

    if args.part in ("all", "roofline"):
        print_roofline()


if __name__ == "__main__":
    main()
