"""`l4jax convert SRC DST`: a Llama 4 checkpoint to l4jax or Hugging Face, streaming.

SRC is any of the three formats (`formats.open_streaming` detects it: Hugging Face, Meta,
l4jax); DST is an l4jax checkpoint (`L4jaxWriter`) or, with `to="hf"`, a Hugging Face
directory (`HFWriter`), streamed by `streaming.transfer`. Every tensor goes through the one
mapping table (`hf_entries`) in HF layout: sources read HF tensors (routed experts a few
experts at a time, `get_rows`), writers take them, a reader thread a few pieces ahead of the
writer. Host memory holds a few tensors (or expert pieces) at a time, never the model: HF
files are read with positioned reads of exactly the bytes needed (nothing stays
memory-mapped), Meta shards are re-mapped every `meta.REMAP_BYTES`, and writes go straight
to disk.

DST is built under `DST.partial-PID-XXXXXXXX` and renamed when complete; on any error (or
interrupt) the partial directory is removed. Its metadata and `config.json` are written last,
so even a killed conversion leaves nothing that loads as a checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from l4jax.convert.export import HFWriter
from l4jax.convert.formats import open_streaming
from l4jax.convert.mapping import check_source, model_entries
from l4jax.convert.orbax import L4jaxWriter
from l4jax.convert.quantized import check_mode
from l4jax.convert.streaming import atomic_directory, numpy_dtype, transfer
from l4jax.errors import CheckpointError, ConfigError
from l4jax.vision_config import with_runtime

log = logging.getLogger(__name__)

TARGETS = ("l4jax", "hf")


@dataclasses.dataclass(frozen=True)
class ConversionResult:
    src: Path
    dst: Path
    src_format: str
    dst_format: str
    dtype: str
    tensors: int
    nbytes: int
    seconds: float
    skipped: tuple[str, ...] = ()  # "FILE: what" of the stored tensors left out

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / 1e6 / max(self.seconds, 1e-9)


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str = "l4jax",
    dtype: Any = None,
    progress: bool = True,
    allow_unexpected: bool = False,
    quantize: str | None = None,
    dequantize: bool = False,
) -> ConversionResult:
    """Convert checkpoint `src` (HF, Meta or l4jax) into a new directory `dst`, streaming.

    `to`: "l4jax" (Orbax params + config.json) or "hf" (sharded safetensors). `dtype`: stored
    dtype (default: the source's, so a round trip is bit-identical). Stored tensors the model
    does not use raise CheckpointError, unless `allow_unexpected`: then they are left out and
    listed in the result's `skipped`.

    `quantize` (int4, int8, fp8: `l4jax.quantize`'s modes) writes a quantized l4jax checkpoint,
    each piece quantized as it streams through. A quantized l4jax source converts only with
    `dequantize` (its weights dequantized to its stored dtype); otherwise a CheckpointError.
    """
    if to not in TARGETS:
        raise ConfigError(f"to: expected one of {TARGETS}, got {to!r}")
    src, dst = Path(src), Path(dst)
    if dst.exists() or dst.is_symlink():
        raise CheckpointError(f"{dst}: already exists (converting never overwrites)")
    if quantize is not None and to != "l4jax":
        raise ConfigError(f"quantize={quantize!r} writes an l4jax checkpoint, not to={to!r}")
    source, src_format, config = open_streaming(src)
    try:
        check_mode(config, quantize)
        stored_mode = getattr(source, "quantization", None)
        if stored_mode is not None and not dequantize:
            raise CheckpointError(
                f"{src}: quantized l4jax checkpoint ({stored_mode}); pass --dequantize to "
                "convert it with its weights dequantized"
            )
        if stored_mode is not None and quantize is not None:
            raise ConfigError(
                f"{src}: already {stored_mode}-quantized; quantize the unquantized checkpoint"
            )
        entries = model_entries(config)
        skipped = check_source(source, config, entries, allow_unexpected)
        for line in skipped:
            log.warning("skipped %s", line)
        target = numpy_dtype(dtype) if dtype is not None else source.dtype(entries[0].hf_key)
        name = str(jnp.dtype(target))
        config = with_runtime(config, dtype=name, param_dtype=name)
        kind = "multimodal" if hasattr(config, "vision") else "text"
        what = name if quantize is None else f"{name}, {quantize}"
        log.info("converting %s (%s, %s) to %s (%s, %s)", src, src_format, kind, dst, to, what)
        start = time.perf_counter()
        try:
            with atomic_directory(dst) as tmp:
                if to == "l4jax":
                    writer = L4jaxWriter(tmp, config, target, quantize)
                else:
                    writer = HFWriter(tmp, config, target)
                desc = f"{src_format} -> {to}"
                nbytes = transfer(source, entries, writer, target, desc, progress)
        except CheckpointError:
            raise
        except OSError as e:  # disk full, permissions, ...
            raise CheckpointError(f"{dst}: write failed ({e})") from e
    finally:
        source.close()
    seconds = time.perf_counter() - start
    dst_dtype = name if quantize is None else f"{name}, {quantize}"
    return ConversionResult(
        src, dst, src_format, to, dst_dtype, len(entries), nbytes, seconds, tuple(skipped)
    )
