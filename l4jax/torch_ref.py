"""PyTorch references (Hugging Face transformers; Meta's llama_models) for cross-checks; needs
the `torch` extra.

Used by `l4jax check`, `l4jax verify`, the benchmarks and the tests, so each builds and runs the
reference the same way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

try:
    import torch
    import transformers
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        f"{e.name} is needed for PyTorch cross-checks: pip install 'l4jax[torch]'"
    ) from None


def build_hf_model(hf_config: dict[str, Any], seed: int = 0) -> Any:
    """A float32 `transformers.Llama4ForCausalLM` with every weight random (norms around 1).

    HF leaves some tensors to its own init; we overwrite all of them from `torch.manual_seed`
    so the model is reproducible and no weight is left at a degenerate value.
    """
    torch.manual_seed(seed)
    fields = {k: v for k, v in hf_config.items() if k not in ("architectures", "torch_dtype")}
    config = transformers.Llama4TextConfig(**fields)
    config._attn_implementation = "eager"
    model = transformers.Llama4ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if "embed" in name else 0.08))
    return model


def hf_logits(model: Any, tokens_bt: np.ndarray) -> np.ndarray:
    """float32 logits [B, T, V] of a HF causal LM, no cache, positions 0..T-1."""
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(np.asarray(tokens_bt, np.int64)), use_cache=False)
    return out.logits.float().numpy()


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| relative to the logits' scale (max |ref|)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


# ---- Meta's reference model (llama_models), on CPU ---------------------------------------------


def init_model_parallel() -> None:
    """A 1-process gloo group and fairscale model parallel size 1 (once per process): what
    `llama_models.llama4.model.Transformer` needs to run outside torchrun."""
    import tempfile
    from pathlib import Path

    import fairscale.nn.model_parallel.initialize as fs_init
    import torch.distributed as dist

    if not dist.is_initialized():
        store = Path(tempfile.mkdtemp()) / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)


@contextlib.contextmanager
def cuda_is_identity() -> Iterator[None]:
    """Meta's Attention allocates its KV cache with `.cuda()`: keep it on the CPU."""
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda


def build_meta_model(params: dict[str, Any], max_seq_len: int = 64, max_batch_size: int = 2) -> Any:
    """Meta's reference `Transformer` for a params.json dict, float32 on the CPU, weights as
    its constructor leaves them."""
    from llama_models.llama4.args import ModelArgs
    from llama_models.llama4.model import Transformer

    init_model_parallel()
    args = ModelArgs(**params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    with cuda_is_identity():
        return Transformer(args).eval()


def load_meta_model(path: str | os.PathLike, max_seq_len: int, max_batch_size: int = 1) -> Any:
    """Meta's reference model (float32) with the weights of Meta checkpoint directory `path`.

    Shards are merged as llama_models merges them for model-parallel size 1
    (`maybe_reshard_state_dict`: `convert_moe_weights`, then `reshard_mp`), but read with
    `torch.load(weights_only=True, mmap=True)` and without its global default-dtype change.
    """
    from llama_models.checkpoint import convert_moe_weights, reshard_mp

    from l4jax.convert.meta import META_TOKENIZER_WORDS, load_shard, read_meta_params, shard_files
    from l4jax.errors import CheckpointError

    path = Path(path)
    params = read_meta_params(path)
    if params.get("vocab_size", -1) <= 0:  # as llama_models' generation.py: the tokenizer's size
        params = {**params, "vocab_size": META_TOKENIZER_WORDS}
    shards = [load_shard(f) for f in shard_files(path)]
    if len(shards) > 1:
        experts = (params.get("moe_args") or {}).get("num_experts")
        if experts:
            shards = [convert_moe_weights(dict(s), experts) for s in shards]
        state = reshard_mp(shards, size=1, rank=0)
    else:
        state = shards[0]
    model = build_meta_model(params, max_seq_len, max_batch_size)
    try:
        missing = model.load_state_dict(state, strict=False).missing_keys
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path}: llama_models cannot load these shards ({reason})") from None
    if missing:
        raise CheckpointError(f"{path}: no tensor for Meta's {missing[0]!r}")
    return model


def meta_logits(model: Any, tokens_bt: np.ndarray) -> np.ndarray:
    """float32 logits [B, T, V] of Meta's reference model at positions 0..T-1."""
    from llama_models.llama4.datatypes import TransformerInput

    batch = TransformerInput(tokens=torch.as_tensor(tokens_bt, dtype=torch.long), tokens_position=0)
    with torch.no_grad():
        return model.forward(batch).logits.float().numpy()
