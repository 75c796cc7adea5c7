"""Post-training benchmark: SFT full fine-tuning vs LoRA vs QLoRA (tokens/s, memory), GRPO
step split.

    python benchmarks/post_training.py --config moe16 --batch 4 --seq 256 --steps 3

For each mode the compiled train step's memory analysis gives the bytes of its arguments (the
train state: params + optimizer state, plus frozen arrays and the batch) and its temporaries;
tokens/s is the mean over `--steps` timed steps after one untimed step. QLoRA is LoRA on a
base quantized with Meta's int4 recipe (`--quantize int4`: routed experts int4, the rest bf16).
The GRPO row times one step's rollout (`l4jax.generate` sampling, rewards, old log-probs) and
its learner step apart.
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from l4jax.config import preset
from l4jax.post import PostConfig, make_task
from l4jax.train_config import LoggingConfig, SampleConfig, TrainConfig
from l4jax.train_step import Trainer
from pipelines import ByteTokenizer, to_global_array
from sharding import make_mesh


def _trainer(config, tc):
    mesh = make_mesh("", devices=jax.devices()[:1])
    return Trainer(config, tc, mesh, lambda m: make_task(config, tc, ByteTokenizer(), m))


def run_sft(config, batch: int, seq: int, steps: int, lora_rank: int, quantize=None) -> dict:
    post = PostConfig(
        lora_rank=lora_rank, lora_targets=("attention", "shared_expert"), quantize=quantize
    )
    tc = TrainConfig(
        steps=steps + 1, batch_size=batch, seq_len=seq, task="sft", post=post,
        logging=LoggingConfig(progress=False), sample=SampleConfig(tokens=0),
    )  # fmt: skip
    trainer = _trainer(config, tc)
    state = trainer.init(0)
    compile_s = trainer.compile(state)
    memory = trainer._step.memory_analysis()
    it, _ = trainer.task.data()
    batches = [to_global_array(next(it), trainer.batch_sharding) for _ in range(steps + 1)]
    state, m = trainer.step(state, batches[0])
    jax.block_until_ready(m["loss"])
    start = time.perf_counter()
    for b in batches[1:]:
        state, m = trainer.step(state, b)
    jax.block_until_ready(m["loss"])
    seconds = (time.perf_counter() - start) / steps
    trained = sum(x.size for x in jax.tree.leaves(state.params))
    mode = f"sft lora r{lora_rank}" if lora_rank else "sft full"
    return {
        "mode": f"sft qlora r{lora_rank} {quantize}" if quantize else mode,
        "trained_params": int(trained),
        "tokens_per_s": batch * seq / seconds,
        "argument_gb": memory.argument_size_in_bytes / 1e9,
        "temp_gb": memory.temp_size_in_bytes / 1e9,
        "compile_s": compile_s,
    }


def run_grpo(config, batch: int, steps: int, generations: int, new_tokens: int) -> dict:
    post = PostConfig(num_generations=generations, max_new_tokens=new_tokens, lora_rank=8)
    tc = TrainConfig(
        steps=steps + 1, batch_size=batch, seq_len=64, task="grpo", post=post,
        logging=LoggingConfig(progress=False), sample=SampleConfig(tokens=0, temperature=1.0),
    )  # fmt: skip
    trainer = _trainer(config, tc)
    state = trainer.init(0)
    trainer.compile(state)
    it, _ = trainer.task.data()
    rollout, learn = [], []
    for i in range(steps + 1):
        start = time.perf_counter()
        b, host = trainer.task.prepare(state, next(it))
        jax.block_until_ready(b["old_logps"])
        mid = time.perf_counter()
        state, m = trainer.step(state, b)
        jax.block_until_ready(m["loss"])
        if i:  # the first step compiles generation
            rollout.append(mid - start)
            learn.append(time.perf_counter() - mid)
    return {
        "mode": f"grpo lora r8, {batch // generations} prompts x {generations}, {new_tokens} new",
        "rollout_s": sum(rollout) / steps,
        "learn_s": sum(learn) / steps,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="moe16")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--grpo-batch", type=int, default=32)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    config = preset(args.config)
    device = jax.devices()[0].device_kind
    print(f"{args.config} on {device}, batch {args.batch} x {args.seq} tokens")
    rows = [
        run_sft(config, args.batch, args.seq, args.steps, 0),
        run_sft(config, args.batch, args.seq, args.steps, args.lora_rank),
        run_sft(config, args.batch, args.seq, args.steps, args.lora_rank, "int4"),
    ]
    for r in rows:
        print(
            f"  {r['mode']:<19} trained {r['trained_params'] / 1e6:8.2f} M  "
            f"{r['tokens_per_s']:9,.0f} tok/s  arguments {r['argument_gb']:.3f} GB  "
            f"temporaries {r['temp_gb']:.3f} GB"
        )
    full = rows[0]
    for name, r in (("LoRA", rows[1]), ("QLoRA", rows[2])):
        print(
            f"  {name} / full: tokens/s {r['tokens_per_s'] / full['tokens_per_s']:.2f}x, "
            f"arguments {r['argument_gb'] / full['argument_gb']:.2f}x"
        )
    grpo = run_grpo(config, args.grpo_batch, args.steps, 8, 16)
    total = grpo["rollout_s"] + grpo["learn_s"]
    print(
        f"  {grpo['mode']}: step {total:.2f} s = rollout {grpo['rollout_s']:.2f} s "
        f"({100 * grpo['rollout_s'] / total:.0f} %) + learning {grpo['learn_s']:.2f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sft": rows, "grpo": grpo}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
