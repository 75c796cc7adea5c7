"""Decode speed: l4jax's KV-cache generation against transformers' `generate`, on CPU.

For each preset (default `moe16`, `moe128`) one random model is built in transformers
(`torch_ref.build_hf_model(config.to_hf_dict())`), saved, and loaded into l4jax, so both run the
same float32 weights. For each batch size, a 128-token prompt (random ids) gets 128 new tokens,
greedy, no stop token, in both:

    time to first token   l4jax: the jitted prefill + first sample; transformers: generate(1)
    decode tokens/s       batch * 127 / (time for the other 127 tokens); transformers: the time
                          of generate(128) minus generate(1)
    cache bytes / token   the KV cache of one row (fp32, as run) / (prompt + new tokens - 1)

Both are warmed up first (l4jax compiles; transformers' first call allocates), then timed once.
Also checks that both produced the same tokens (a mismatch only means a near-tie in a random
model; the tests check token identity on small configs).

    python benchmarks/decode.py [--presets moe16 moe128] [--batches 1 8] [--prompt 128] [--new 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from l4jax.config import preset  # noqa: E402
from l4jax.convert import from_pretrained  # noqa: E402
from l4jax.decoding import decode, make_loop, prefill  # noqa: E402
from l4jax.kv_cache import cache_bytes  # noqa: E402
from l4jax.torch_ref import build_hf_model  # noqa: E402


def time_l4jax(model, params, prompt_bt: np.ndarray, new: int) -> tuple[float, float, np.ndarray]:
    """(time to first token, seconds for the other new-1 tokens, new ids [B, new])."""
    b, t = prompt_bt.shape
    loop = make_loop(model, b, new)
    lengths, key = np.full(b, t), jax.random.key(0)

    def run():
        start = time.perf_counter()
        state = prefill(loop, params, prompt_bt, lengths, key, ())
        state.tokens.block_until_ready()
        first = time.perf_counter()
        state = decode(loop, params, state, lengths, key, ())
        ids = np.asarray(state.tokens)
        return first - start, time.perf_counter() - first, ids[:, t:]

    run()  # compile
    return run()


def time_hf(hf, prompt_bt: np.ndarray, new: int) -> tuple[float, float, np.ndarray]:
    inputs = torch.from_numpy(prompt_bt.astype(np.int64))
    kwargs = dict(attention_mask=torch.ones_like(inputs), do_sample=False, pad_token_id=0)

    def generate(n):
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(inputs, max_new_tokens=n, min_new_tokens=n, **kwargs)
        return time.perf_counter() - start, out[:, prompt_bt.shape[1] :].numpy()

    generate(2)  # warm-up
    ttft, _ = generate(1)
    total, ids = generate(new)
    return ttft, total - ttft, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["moe16", "moe128"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    args = parser.parse_args()
    print(
        f"decode on {jax.devices()[0].platform.upper()}, float32, prompt {args.prompt}, "
        f"{args.new} new tokens, greedy; torch threads {torch.get_num_threads()}"
    )
    header = (
        f"{'preset':<8}{'batch':>6}{'TTFT l4jax':>12}{'TTFT HF':>10}"
        f"{'tok/s l4jax':>13}{'tok/s HF':>10}{'ratio':>8}{'cache B/tok':>13}{'same ids':>10}"
    )
    print(header)
    for name in args.presets:
        config = preset(name)
        hf = build_hf_model(config.to_hf_dict(), seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            model, params = from_pretrained(tmp, dtype="float32")
        max_len = args.prompt + args.new - 1
        per_token = cache_bytes(model.config, max_len, dtype="float32") / max_len
        for batch in args.batches:
            prompt = np.random.default_rng(batch).integers(
                0, config.vocab_size, (batch, args.prompt), dtype=np.int32
            )
            j_ttft, j_decode, j_ids = time_l4jax(model, params, prompt, args.new)
            h_ttft, h_decode, h_ids = time_hf(hf, prompt, args.new)
            steps = batch * (args.new - 1)
            j_rate, h_rate = steps / j_decode, steps / h_decode
            print(
                f"{name:<8}{batch:>6}{j_ttft:>11.3f}s{h_ttft:>9.3f}s{j_rate:>13.1f}"
                f"{h_rate:>10.1f}{j_rate / h_rate:>7.1f}x{per_token:>13,.0f}"
                f"{np.mean(j_ids == h_ids):>10.0%}",
                flush=True,
            )


if __name__ == "__main__":
    main()
