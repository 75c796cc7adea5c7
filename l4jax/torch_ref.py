"""PyTorch references (Hugging Face transformers) for cross-checks; needs the `torch` extra.

Used by `l4jax check`, `l4jax verify`, the benchmarks and the tests, so each builds and runs the
reference the same way.
"""

from __future__ import annotations

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
