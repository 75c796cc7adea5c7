"""Numerical cross-checks against PyTorch: `l4jax verify SRC` and `l4jax check`.

`verify` loads a checkpoint in its PyTorch reference (transformers for Hugging Face, Meta's
llama_models for Meta's format; an l4jax checkpoint is exported to Hugging Face first) and in
l4jax, and prints the logit difference on a fixed prompt; `check` does the same on a freshly
built random model of a preset and also times both forward passes. Both need the `torch` extra.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from l4jax.config import preset
from l4jax.convert.formats import open_streaming
from l4jax.convert.load import from_pretrained

log = logging.getLogger(__name__)
FP32_TOLERANCE = 1e-4  # max |diff| / max |logit|


@dataclasses.dataclass
class Comparison:
    backend: str
    rel_err: float

    @property
    def ok(self) -> bool:
        return self.rel_err < FP32_TOLERANCE


def fixed_prompt(vocab_size: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, (batch, length), dtype=np.int32)


def compare_backends(
    path: Path, tokens: np.ndarray, ref: np.ndarray, backends: tuple[str, ...]
) -> list[Comparison]:
    """l4jax logits of the checkpoint at `path` (fp32) against reference logits, per backend."""
    from l4jax.torch_ref import rel_err

    results = []
    for backend in backends:
        model, params = from_pretrained(path, dtype="float32", text_only=True, moe_impl=backend)
        logits = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens))
        results.append(Comparison(backend, rel_err(np.asarray(logits), ref)))
    return results


REFERENCES = {
    "hf": "transformers",
    "meta": "llama_models",
    "l4jax": "transformers, on its Hugging Face export",
}


def reference_name(path: str | Path) -> str:
    """The PyTorch reference `verify` uses for the checkpoint at `path`."""
    return REFERENCES[checkpoint_format(path)]


def checkpoint_format(path: str | Path) -> str:
    source, name, _ = open_streaming(path)
    source.close()
    return name


def verify(path: str | Path, tokens: int = 128, batch: int = 1) -> list[Comparison]:
    """Logit difference between the PyTorch reference and l4jax for checkpoint `path`."""
    path = Path(path)
    kind = checkpoint_format(path)
    if kind == "meta":
        from l4jax.convert.meta import MetaCheckpoint
        from l4jax.torch_ref import load_meta_model, meta_logits

        with MetaCheckpoint(path) as ckpt:
            vocab = ckpt.hf_config()["vocab_size"]
        log.info("loading %s in llama_models", path)
        model = load_meta_model(path, max_seq_len=tokens, max_batch_size=batch)
        prompt = fixed_prompt(vocab, batch, tokens)
        return compare_backends(path, prompt, meta_logits(model, prompt), ("ragged_dot",))
    if kind == "l4jax":
        from l4jax.convert.conversion import convert_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            log.info("exporting %s to Hugging Face for transformers", path)
            hf_dir = Path(tmp) / "hf"
            convert_checkpoint(path, hf_dir, to="hf", dtype="float32", progress=False)
            prompt, ref = _transformers_logits(hf_dir, tokens, batch)
        return compare_backends(path, prompt, ref, ("ragged_dot",))
    prompt, ref = _transformers_logits(path, tokens, batch)
    return compare_backends(path, prompt, ref, ("ragged_dot",))


def _transformers_logits(path: Path, tokens: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(fixed prompt, float32 transformers logits) of HF checkpoint `path`."""
    import transformers

    from l4jax.torch_ref import hf_logits

    log.info("loading %s in transformers", path)
    hf = transformers.Llama4ForCausalLM.from_pretrained(path, dtype="float32").eval()
    prompt = fixed_prompt(hf.config.vocab_size, batch, tokens)
    return prompt, hf_logits(hf, prompt)


def _median_seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up (and jit compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def check(
    preset_name: str = "demo", tokens: int = 256, batch: int = 2, seed: int = 0
) -> dict[str, Any]:
    """Build a random HF model of a preset, compare l4jax against it, time both forwards."""
    import torch

    from l4jax.torch_ref import build_hf_model, hf_logits

    config = preset(preset_name)
    prompt = fixed_prompt(config.vocab_size, batch, tokens, seed)
    log.info("building a random transformers model of preset %r", preset_name)
    hf = build_hf_model(config.to_hf_dict(), seed=seed)
    ref = hf_logits(hf, prompt)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        comparisons = compare_backends(Path(tmp), prompt, ref, ("ragged_dot", "dense"))
        model, params = from_pretrained(tmp, dtype="float32")
    forward = jax.jit(model.apply)
    l4jax_s = _median_seconds(
        lambda: forward({"params": params}, jnp.asarray(prompt)).block_until_ready()
    )
    with torch.no_grad():
        hf_s = _median_seconds(lambda: hf(input_ids=torch.from_numpy(prompt.astype(np.int64))))
    n = prompt.size
    return dict(
        preset=preset_name,
        params=config.num_params(),
        comparisons=comparisons,
        l4jax_tokens_per_s=n / l4jax_s,
        hf_tokens_per_s=n / hf_s,
        speedup=hf_s / l4jax_s,
    )


def report(comparisons: list[Comparison]) -> bool:
    for c in comparisons:
        status = "ok" if c.ok else "MISMATCH"
        print(f"  {c.backend:<11} max|diff|/max|logit| = {c.rel_err:.2e}  {status}")
    return all(c.ok for c in comparisons)
