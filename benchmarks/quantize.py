"""Quantized weights: parameter bytes, decode speed, quality, and the Pallas kernel's roofline.

Three parts, all in one run by default:

    speed      moe16 / moe128 random models, weights stored in bf16 (the baseline) or quantized
               int8 / int4 / fp8 (`l4jax.quantize`), computed in float32 on CPU: parameter
               bytes and decode tokens/s at batch 1 (`--prompt` prompt tokens, `--new` new
               tokens, greedy), all from the same bf16 weights, in one process.
    quality    the `demo` preset trained for `--train-steps` steps on its built-in corpus (the
               quickstart), then: held-out perplexity (l4jax's own sources, never trained on,
               byte tokenizer) of the bf16 weights and of each quantized mode, and greedy
               agreement with the bf16 model over 128 new tokens from held-out prompts.
    roofline   on paper, per grid step of the grouped-matmul kernels: FLOPs per HBM byte of
               `gmm` (bf16 weights) and `qgmm` (int8 / int4 weights, fp32 scales) for decode-
               and prefill-sized row tiles, and the MoE weight bytes one decode step reads.

    python benchmarks/quantize.py [--parts speed quality roofline] [--presets moe16 moe128]
        [--train-steps 150] [--prompt 32] [--new 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from l4jax.config import preset  # noqa: E402
from l4jax.decoding import decode, make_loop, prefill  # noqa: E402
from l4jax.model import Llama4ForCausalLM, init_params  # noqa: E402
from l4jax.quantization import MODES, nbytes, quantize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def to_bf16(params):
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)


def variants(params, config):
    """{"bf16": bf16 params, mode: quantized from those bf16 params}."""
    base = to_bf16(params)
    return {"bf16": base, **{mode: quantize(base, config, mode) for mode in MODES}}


# ---- speed --------------------------------------------------------------------------------------


def decode_speed(model, params, prompt_bt: np.ndarray, new: int) -> float:
    b, t = prompt_bt.shape
    loop = make_loop(model, b, new)
    lengths, key = np.full(b, t), jax.random.key(0)

    def run():
        state = prefill(loop, params, prompt_bt, lengths, key, ())
        state.tokens.block_until_ready()
        start = time.perf_counter()
        state = decode(loop, params, state, lengths, key, ())
        np.asarray(state.tokens)
        return time.perf_counter() - start

    run()  # compile
    return b * (new - 1) / min(run(), run())


def part_speed(args) -> None:
    print("| preset | weights | param bytes | vs bf16 | decode tok/s (batch 1) | vs bf16 |")
    print("|---|---|---|---|---|---|")
    for name in args.presets:
        config = preset(name, dtype="float32", param_dtype="float32")
        model = Llama4ForCausalLM(config)
        prompt = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.prompt))
        base_bytes = base_speed = None
        for mode, params in variants(init_params(config, 0), config).items():
            size, speed = nbytes(params), decode_speed(model, params, prompt, args.new)
            base_bytes, base_speed = base_bytes or size, base_speed or speed
            print(
                f"| {name} | {mode} | {size / 1e6:.1f} MB | {size / base_bytes:.2f}x "
                f"| {speed:.1f} | {speed / base_speed:.2f}x |",
                flush=True,
            )


# ---- quality ------------------------------------------------------------------------------------


def held_out_rows(tokenizer, seq_len: int, rows: int) -> np.ndarray:
    """[rows, seq_len + 1] token rows from l4jax's own sources (not in the training corpus)."""
    text = "\n".join(p.read_text() for p in sorted((ROOT / "l4jax").rglob("*.py")))
    ids = np.asarray(tokenizer.encode(text), np.int32)
    n = min(rows, len(ids) // (seq_len + 1))
    return ids[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def perplexity(model, params, rows: np.ndarray) -> float:
    @jax.jit
    def nll(params, row_bt):
        logits = model.apply({"params": params}, row_bt[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, row_bt[:, 1:, None], axis=-1))

    return float(np.exp(np.mean([nll(params, rows[i : i + 4]) for i in range(0, len(rows), 4)])))


def greedy(model, params, prompt_bt: np.ndarray, new: int) -> np.ndarray:
    b, t = prompt_bt.shape
    loop = make_loop(model, b, new)
    lengths, key = np.full(b, t), jax.random.key(0)
    state = prefill(loop, params, prompt_bt, lengths, key, ())
    state = decode(loop, params, state, lengths, key, ())
    return np.asarray(state.tokens)[:, t:]


def part_quality(args) -> None:
    from l4jax.train import train
    from l4jax.train_config import CheckpointConfig, LoggingConfig, TrainConfig
    from pipelines import tokenizer_for

    config = preset("demo")
    tc = TrainConfig(
        steps=args.train_steps,
        checkpoint=CheckpointConfig(async_save=False),
        logging=LoggingConfig(progress=False),
    )
    start = time.perf_counter()
    result = train(config, tc, sample=False)
    losses = result.losses
    print(
        f"demo trained {args.train_steps} steps in {time.perf_counter() - start:.0f} s, "
        f"loss {losses[min(losses)]:.2f} -> {losses[max(losses)]:.2f}",
        flush=True,
    )
    params = jax.device_get(result.state.params)
    eval_config = config.replace(dtype="float32")
    model = Llama4ForCausalLM(eval_config)
    tokenizer = tokenizer_for(config)
    rows = held_out_rows(tokenizer, tc.seq_len, args.eval_rows)
    prompts = rows[: args.greedy_rows, :32]
    base_ppl = base_ids = None
    print(f"\nheld-out: {rows.shape[0]} rows x {tc.seq_len} tokens; greedy: 128 new tokens")
    print("| weights | bytes | held-out ppl | vs bf16 | greedy tokens equal | first divergence |")
    print("|---|---|---|---|---|---|")
    for mode, p in variants(params, eval_config).items():
        ppl, ids = perplexity(model, p, rows), greedy(model, p, prompts, 128)
        base_ppl = base_ppl or ppl
        base_ids = ids if base_ids is None else base_ids
        same = ids == base_ids
        first = [int(np.argmin(r)) if not r.all() else 128 for r in same]
        print(
            f"| {mode} | {nbytes(p) / 1e6:.2f} MB | {ppl:.3f} | {100 * (ppl / base_ppl - 1):+.2f}% "
            f"| {100 * same.mean():.1f}% | {min(first)} (mean {np.mean(first):.0f}) |",
            flush=True,
        )


# ---- roofline on paper --------------------------------------------------------------------------

# per weight value, with the fp32 scales (int8/fp8: one per output channel, negligible)
WEIGHT_BYTES = {"bf16": 2.0, "int8 / fp8": 1.0, "int4": 0.5 + 4 / 128}


def part_roofline(args) -> None:
    """A grid step multiplies a [tm, tk] bf16 row tile by a [tk, tn] weight tile: 2*tm*tk*tn
    FLOPs for tm*tk*2 + tk*tn*b bytes (the output is amortised over the K loop)."""
    print(
        "| row tile tm (rows per expert) | tk x tn | bf16 FLOP/B | int8/fp8 FLOP/B | int4 FLOP/B |"
    )
    print("|---|---|---|---|---|")
    for tm in (8, 128, 512):
        for t in (128, 512):
            flops = 2 * tm * t * t
            cells = [flops / (tm * t * 2 + t * t * b) for b in WEIGHT_BYTES.values()]
            print(f"| {tm} | {t} x {t} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    print("\nRouted-expert weight bytes (read by a decode step whose batch touches every expert):")
    for name in ("scout", "maverick"):
        c = preset(name)
        per_layer = c.num_local_experts * 3 * c.hidden_size * c.intermediate_size
        layers = sum(k.is_moe for k in c.layer_kinds)
        cells = [
            f"{mode} {per_layer * layers * b / 1e9:.1f} GB" for mode, b in WEIGHT_BYTES.items()
        ]
        print(f"  {name}: " + ", ".join(cells))
    print(
        "A step is HBM bound below the ridge (~240 FLOP/B v5e, ~166 v5p): at decode-sized tiles "
        "its time is the weight bytes, so int8 reads 0.5x and int4 ~0.27x of bf16."
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["speed", "quality", "roofline"])
    p.add_argument("--presets", nargs="+", default=["moe16", "moe128"])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--eval-rows", type=int, default=32)
    p.add_argument("--greedy-rows", type=int, default=4)
    args = p.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({len(jax.devices())} device)")
    for part in args.parts:
        print(f"\n== {part}")
        {"speed": part_speed, "quality": part_quality, "roofline": part_roofline}[part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
