"""The `l4jax` command line (also `python -m l4jax`)."""

from __future__ import annotations

import argparse
import logging
import sys

from l4jax.config import PRESETS
from l4jax.errors import CheckpointError, ConfigError, ImageError, InputError


def _check(args: argparse.Namespace) -> int:
    from l4jax.verify import check, report

    result = check(args.preset, tokens=args.tokens, batch=args.batch, seed=args.seed)
    print(
        f"l4jax check: preset {result['preset']!r}, {result['params'] / 1e6:.1f}M params, "
        f"{args.batch}x{args.tokens} tokens, float32, against transformers (PyTorch)"
    )
    ok = report(result["comparisons"])
    print(
        f"  forward     l4jax {result['l4jax_tokens_per_s']:,.0f} tok/s   "
        f"transformers {result['hf_tokens_per_s']:,.0f} tok/s   "
        f"ratio {result['speedup']:.2f}x"
    )
    return 0 if ok else 1


def _verify(args: argparse.Namespace) -> int:
    from l4jax.verify import reference_name, report, verify

    reference = reference_name(args.src)
    print(f"l4jax verify {args.src}: logits against {reference}, {args.tokens} tokens")
    return 0 if report(verify(args.src, tokens=args.tokens)) else 1


def _convert(args: argparse.Namespace) -> int:
    import signal

    from l4jax.convert.conversion import convert_checkpoint

    # a terminated conversion unwinds like Ctrl-C: its partial directory is removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    r = convert_checkpoint(
        args.src,
        args.dst,
        to=args.to,
        dtype=args.dtype,
        allow_unexpected=args.allow_unexpected,
        quantize=args.quantize,
        dequantize=args.dequantize,
    )
    for line in r.skipped:
        print(f"l4jax convert: skipped {line}", file=sys.stderr)
    print(
        f"l4jax convert: {r.src} ({r.src_format}) -> {r.dst} ({r.dst_format}, {r.dtype}): "
        f"{r.tensors} tensors, {r.nbytes / 1e9:.2f} GB in {r.seconds:.1f} s "
        f"({r.mb_per_s:,.0f} MB/s)"
    )
    return 0


def _merge_lora(args: argparse.Namespace) -> int:
    from l4jax.post.lora import merge_lora_run

    dst, config = merge_lora_run(args.run_dir, args.dst, args.step)
    print(
        f"l4jax merge-lora: {args.run_dir} -> {dst} (l4jax checkpoint, {config.num_params():,} "
        "params, adapters folded in)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l4jax", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is being done")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="random model of a preset vs transformers: logits and speed")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p.add_argument("--tokens", type=int, default=256, help="sequence length")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_check)

    p = sub.add_parser("verify", help="a checkpoint in its PyTorch reference vs l4jax: logits")
    p.add_argument("src", help="checkpoint directory (Hugging Face, Meta or l4jax)")
    p.add_argument("--tokens", type=int, default=128)
    p.set_defaults(run=_verify)

    p = sub.add_parser(
        "convert", help="convert a checkpoint (Hugging Face, Meta, l4jax) to l4jax or HF, streaming"
    )
    p.add_argument("src", help="checkpoint directory; its format is detected")
    p.add_argument("dst", help="new directory (must not exist)")
    p.add_argument("--to", default="l4jax", choices=("l4jax", "hf"), help="format of DST")
    p.add_argument(
        "--dtype", choices=("bfloat16", "float32"), help="stored dtype (default: the source's)"
    )
    p.add_argument(
        "--allow-unexpected",
        action="store_true",
        help="leave out stored tensors the model does not use (listed) instead of failing",
    )
    p.add_argument(
        "--quantize",
        choices=("int4", "int8", "fp8"),
        help="write a quantized l4jax checkpoint (docs/quantization.md), quantizing as it streams",
    )
    p.add_argument(
        "--dequantize",
        action="store_true",
        help="convert a quantized l4jax checkpoint with its weights dequantized (needed for it)",
    )
    p.set_defaults(run=_convert)

    p = sub.add_parser(
        "merge-lora", help="fold a LoRA run's adapters into its base: a plain l4jax checkpoint"
    )
    p.add_argument("run_dir", metavar="RUN", help="the LoRA training run (its --checkpoint-dir)")
    p.add_argument("dst", help="new l4jax checkpoint directory (must not exist)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.set_defaults(run=_merge_lora)

    from l4jax.train_cli import add_train_arguments, run_cli

    p = sub.add_parser("train", help="train a preset/config on text (default: the demo MoE)")
    add_train_arguments(p)
    p.set_defaults(run=run_cli)

    from l4jax.generate_cli import add_generation_arguments, run_chat_cli, run_generate_cli

    p = sub.add_parser("generate", help="generate text (checkpoint or random preset), streaming")
    add_generation_arguments(p, chat=False)
    p.set_defaults(run=run_generate_cli)

    p = sub.add_parser("chat", help="chat interactively on stdin (checkpoint or random preset)")
    add_generation_arguments(p, chat=True)
    p.set_defaults(run=run_chat_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.run(args)
    except (ConfigError, CheckpointError, ImageError, InputError, FileNotFoundError) as e:
        print(f"l4jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
