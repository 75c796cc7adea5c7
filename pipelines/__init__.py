"""Grain input pipelines for l4jax training: sources, tokenization and packing, batching."""

from pipelines.loader import DataConfig, make_dataset, to_global_array
from pipelines.packing import ByteTokenizer, next_token_targets, pack, tokenizer_for
from pipelines.sources import default_corpus, open_source

__all__ = [
    "ByteTokenizer",
    "DataConfig",
    "default_corpus",
    "make_dataset",
    "next_token_targets",
    "open_source",
    "pack",
    "to_global_array",
    "tokenizer_for",
]
