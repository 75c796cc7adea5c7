"""The training input pipeline: documents -> shuffled, tokenized, packed, batched rows.

    MapDataset.source(documents)[process::processes]    # each host reads its own documents
      .shuffle(seed).repeat()                            # reshuffled every epoch
      .map(Tokenize)                                     # optionally in worker processes
      -> pack(seq_len) -> batch(rows per process)        # concat-then-split, segment ids

Deterministic for a seed; the iterator's state (`get_state`/`set_state`, a small JSON dict) is
saved with every training checkpoint, so a resumed run reads exactly the batches it would have.
`global_batch` is the batch of all hosts together; each host yields `global_batch / processes`
rows and `to_global_array` assembles the global, sharded `jax.Array`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding

from l4jax.errors import ConfigError
from pipelines.packing import Tokenize, pack

Batch = dict[str, np.ndarray]  # tokens, segment_ids, positions: [B, T] int32


@dataclasses.dataclass(frozen=True)
class DataConfig:
    seq_len: int
    global_batch: int
    seed: int = 0
    workers: int = 0  # tokenizer worker processes (0: in the training process)
    prefetch: int = 2  # batches read ahead in a background thread (0: none)
    bos: bool = True
    eos: bool = True
    vocab_size: int | None = None  # token ids are checked against it


def process_slice() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


def make_dataset(
    source: Any,
    tokenizer: Any,
    config: DataConfig,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The infinite dataset of batches {tokens, segment_ids, positions} [B_local, T] int32."""
    if process_index is None or process_count is None:
        process_index, process_count = process_slice()
    if config.global_batch % process_count:
        raise ConfigError(
            f"batch size {config.global_batch} is not divisible by {process_count} processes"
        )
    if len(source) < process_count:
        raise ConfigError(f"data: {len(source)} documents for {process_count} processes")
    docs = grain.MapDataset.source(source)[process_index::process_count]
    docs = docs.shuffle(seed=config.seed).repeat(None)
    tokens = docs.map(Tokenize(tokenizer, config.bos, config.eos, config.vocab_size))
    it = tokens.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=16))
    if config.workers > 0:
        if not flags.FLAGS.is_parsed():  # Grain's worker setup reads absl flags
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.workers))
    rows = pack(it, config.seq_len)
    batches = rows.batch(config.global_batch // process_count, drop_remainder=True)
    if config.prefetch > 0:
        batches = grain.experimental.ThreadPrefetchIterDataset(
            batches, prefetch_buffer_size=config.prefetch
        )
    return batches


def to_global_array(batch: Batch, sharding: NamedSharding) -> dict[str, jax.Array]:
    """This host's rows -> global arrays sharded as `sharding` (rows split across hosts)."""
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(x))
        for name, x in batch.items()
    }
