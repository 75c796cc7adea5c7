"""Train-step throughput and memory: l4jax vs Hugging Face transformers + torch AdamW, on CPU.

    python benchmarks/train.py                           # moe16 and moe128, batch 4 x 256
    python benchmarks/train.py --configs moe16 --steps 3 --batch 2 --seq 128
    python benchmarks/train.py --configs moe128 --layers 4 --memory-limit-gb 12

Both sides train the same config (fp32) on the same token batch with AdamW (same
hyperparameters, global-norm clipping); l4jax runs its jitted train step (dropless top-k
experts), transformers computes every expert for every token as its reference does. Each side
runs in its own child process with an address-space limit (`--memory-limit-gb`, default 24:
"a 24 GB machine"), so running out of memory is a clean failure of that child, never of the
machine; peak memory is the child's max RSS. Prints compile time (l4jax), step time, tokens/s,
peak memory, and the throughput ratio.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LR, B1, B2, EPS, WD, CLIP = 1e-4, 0.9, 0.95, 1e-8, 0.1, 1.0


def _tokens(vocab: int, batch: int, seq: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab, (batch, seq)).astype(np.int32)


def _config(name: str, layers: int | None):
    from l4jax import preset

    return preset(name, num_hidden_layers=layers) if layers else preset(name)


def run_l4jax(name: str, layers: int | None, batch: int, seq: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from l4jax.train_config import OptimizerConfig, TrainConfig
    from l4jax.train_step import Trainer
    from sharding import make_mesh

    config = _config(name, layers)
    tc = TrainConfig(
        batch_size=batch, seq_len=seq,
        optimizer=OptimizerConfig(
            learning_rate=LR, warmup_steps=0, b1=B1, b2=B2, eps=EPS, weight_decay=WD,
            clip_norm=CLIP,
        ),
    )  # fmt: skip
    trainer = Trainer(config, tc, make_mesh("", devices=jax.devices()[:1]))
    state = trainer.init(seed=0)
    compile_s = trainer.compile(state)
    tokens = jnp.asarray(_tokens(config.vocab_size, batch, seq))
    ones = jnp.ones_like(tokens)
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), tokens.shape)
    rows = {"tokens": tokens, "segment_ids": ones, "positions": positions}
    state, metrics = trainer.step(state, rows)  # first run (allocations), not timed
    losses = [float(metrics["loss"])]
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = trainer.step(state, rows)
        losses.append(float(metrics["loss"]))
    seconds = (time.perf_counter() - start) / steps
    return {"compile_s": compile_s, "step_s": seconds, "losses": losses, "ok": bool(np.all(
        np.isfinite(losses)))}  # fmt: skip


def run_hf(name: str, layers: int | None, batch: int, seq: int, steps: int) -> dict:
    import torch

    from l4jax.torch_ref import build_hf_model

    torch.set_num_threads(os.cpu_count() or 1)
    config = _config(name, layers)
    model = build_hf_model(config.to_hf_dict(), seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    tokens = torch.from_numpy(_tokens(config.vocab_size, batch, seq).astype("int64"))

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=tokens, labels=tokens, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        return float(out.loss)

    losses = [step()]
    start = time.perf_counter()
    for _ in range(steps):
        losses.append(step())
    return {"step_s": (time.perf_counter() - start) / steps, "losses": losses, "ok": True}


def _child(fn, args, limit_bytes, queue) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    try:
        result = fn(*args)
    except MemoryError:
        result = {"ok": False, "error": "out of memory (MemoryError)"}
    except RuntimeError as e:  # torch: "DefaultCPUAllocator: can't allocate memory"
        oom = "allocate" in str(e) or "memory" in str(e).lower()
        result = {"ok": False, "error": ("out of memory: " if oom else "") + str(e)[:200]}
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        result = {
            "ok": False,
            "error": f"{type(e).__name__}: {e}"[:300],
            "tb": traceback.format_exc(),
        }
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    queue.put(result)


def in_child(fn, args, limit_gb: float) -> dict:
    """Run fn(*args) in a fresh process under an address-space limit; its result and peak RSS."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, int(limit_gb * 2**30), queue))
    proc.start()
    proc.join()
    if not queue.empty():
        return queue.get()
    return {"ok": False, "error": f"child died (exit code {proc.exitcode}), likely out of memory"}


def static_training_gb(name: str, layers: int | None) -> float:
    """fp32 params + grads + Adam mu and nu: 16 bytes per parameter (both frameworks)."""
    return 16 * _config(name, layers).num_params() / 2**30


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="moe16,moe128")
    p.add_argument("--layers", type=int, help="override num_hidden_layers (reduced runs)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one untimed)")
    p.add_argument("--memory-limit-gb", type=float, default=24.0)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    results = {}
    for name in args.configs.split(","):
        config = _config(name, args.layers)
        tokens = args.batch * args.seq
        print(
            f"\n== {name}: {config.num_hidden_layers} layers, {config.num_local_experts} experts "
            f"(top-{config.num_experts_per_tok}), {config.num_params() / 1e6:.0f}M params, "
            f"batch {args.batch}x{args.seq}, fp32 AdamW, CPU ({os.cpu_count()} cores), "
            f"limit {args.memory_limit_gb:g} GB; params+grads+Adam alone: "
            f"{static_training_gb(name, args.layers):.1f} GB",
            flush=True,
        )
        row = {}
        call = (name, args.layers, args.batch, args.seq, args.steps)
        row["l4jax"] = in_child(run_l4jax, call, args.memory_limit_gb)
        sides = ["l4jax"]
        if not args.skip_hf:
            row["hf"] = in_child(run_hf, call, args.memory_limit_gb)
            sides.append("hf")
        for side in sides:
            r = row[side]
            label = "l4jax (jit, dropless top-k)" if side == "l4jax" else "transformers + torch"
            if r.get("ok"):
                r["tokens_per_s"] = tokens / r["step_s"]
                extra = f", compile {r['compile_s']:.1f} s" if "compile_s" in r else ""
                print(
                    f"  {label:<29} {r['step_s']:7.2f} s/step  {r['tokens_per_s']:8,.0f} tok/s  "
                    f"peak {r['peak_rss_gb']:5.1f} GB{extra}  loss {r['losses'][0]:.3f}"
                )
            else:
                print(
                    f"  {label:<29} FAILED: {r.get('error')} "
                    f"(peak {r.get('peak_rss_gb', 0):.1f} GB)"
                )
        if row.get("hf", {}).get("ok") and row["l4jax"].get("ok"):
            ratio = row["l4jax"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
            row["speedup"] = ratio
            print(f"  ratio l4jax / transformers: {ratio:.2f}x")
        results[name] = row
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
