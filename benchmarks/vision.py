"""Vision tower throughput: l4jax's `Llama4VisionModel` (jitted) against transformers' (eager).

Both run the same random weights on the same 336x336 tiles (real tile geometry: 576 patches +
CLS, 144 output tokens per tile) on this machine's default JAX device and PyTorch's CPU, in
float32; prints seconds per call (best of `--repeats`, after a warm-up/compile call), tiles per
second, the ratio, and the features' max|diff|/max|ref|.

    python benchmarks/vision.py                       # reduced width/depth, 5 tiles
    python benchmarks/vision.py --full --tiles 17     # Scout/Maverick's tower (34 x 1408)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiles", type=int, default=5, help="tiles per call (5 = a 2x2 image)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--full", action="store_true", help="the real tower (34 layers, 1408 wide)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from l4jax.convert.mapping import vision_entries
    from l4jax.torch_ref import rel_err
    from l4jax.vision import Llama4VisionModel
    from l4jax.vision_config import Llama4VisionConfig

    if args.full:
        vision = Llama4VisionConfig()
    else:
        d = args.hidden
        vision = Llama4VisionConfig(
            hidden_size=d,
            intermediate_size=4 * d,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            projector_input_dim=2 * d,
            projector_output_dim=2 * d,
            vision_output_dim=2 * d,
        )
    hf_config = transformers.Llama4VisionConfig(**vision.to_hf_dict())
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = transformers.Llama4VisionModel(hf_config).eval()
    with torch.no_grad():
        for name, w in hf.named_parameters():
            parts = name.split(".")
            norm = len(parts) > 1 and "norm" in parts[-2] and parts[-1] == "weight"
            w.copy_(torch.randn_like(w) * 0.02 + (1.0 if norm else 0.0))
    state = {f"vision_model.{k}": v.numpy() for k, v in hf.state_dict().items()}
    params: dict = {}
    for entry in vision_entries(vision, text_hidden_size=1):
        if entry.hf_key not in state:
            continue  # the projector
        for slot, array in zip(entry.slots, entry.split(state[entry.hf_key])):
            node = params
            for name in slot.path[1:-1]:
                node = node.setdefault(name, {})
            if slot.group is None:
                node[slot.path[-1]] = array
            else:
                node.setdefault(slot.path[-1], [None] * vision.num_hidden_layers)
                node[slot.path[-1]][slot.group] = array
    params = jax.tree.map(
        lambda x: np.stack(x) if isinstance(x, list) else x,
        params,
        is_leaf=lambda x: isinstance(x, list),
    )
    tiles = np.random.default_rng(0).uniform(-1, 1, (args.tiles, 3, 336, 336)).astype(np.float32)
    apply = jax.jit(Llama4VisionModel(vision).apply)
    variables = {"params": jax.device_put(params)}
    pixels = jnp.asarray(tiles)

    def run_jax():
        return apply(variables, pixels).block_until_ready()

    def run_torch():
        with torch.no_grad():
            return hf(torch.from_numpy(tiles)).last_hidden_state

    def best(fn):
        out = fn()  # warm-up (compiles the JAX one)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times), out

    t_jax, out_jax = best(run_jax)
    t_torch, out_torch = best(run_torch)
    n_params = sum(w.numel() for w in hf.parameters())
    print(
        f"vision tower: {vision.num_hidden_layers} layers x {vision.hidden_size}, "
        f"{n_params / 1e6:.1f}M params, {args.tiles} tiles of 336px, float32"
    )
    platform = jax.devices()[0].platform
    err = rel_err(np.asarray(out_jax), out_torch.numpy())
    print(f"  l4jax ({platform}, jit)  {t_jax:8.3f} s  {args.tiles / t_jax:8.1f} tiles/s")
    print(f"  transformers (cpu)   {t_torch:8.3f} s  {args.tiles / t_torch:8.1f} tiles/s")
    print(f"  speedup {t_torch / t_jax:.2f}x   max|diff|/max|ref| {err:.1e}")


if __name__ == "__main__":
    main()
