"""The `l4jax` command line (also `python -m l4jax`)."""

from __future__ import annotations

import argparse
import logging
import sys

from l4jax.config import PRESETS
from l4jax.errors import CheckpointError, ConfigError


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
    from l4jax.verify import report, verify

    print(f"l4jax verify {args.src}: logits against transformers, {args.tokens} tokens")
    return 0 if report(verify(args.src, tokens=args.tokens)) else 1


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

    p = sub.add_parser("verify", help="a Hugging Face checkpoint in transformers vs l4jax")
    p.add_argument("src", help="checkpoint directory")
    p.add_argument("--tokens", type=int, default=128)
    p.set_defaults(run=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.run(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"l4jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
