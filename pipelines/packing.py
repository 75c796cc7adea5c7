"""Tokenize documents, pack them into fixed-length rows with segment ids, and derive targets.

Packing is Grain's concat-then-split: documents are laid end to end and cut every `seq_len`
tokens, so rows carry no padding except at the very end of the data. Each row has

    tokens [T] int32        the packed token ids
    segment_ids [T] int32   1, 2, ... per document piece in the row, 0 for padding
    positions [T] int32     position inside the document piece (restarts at 0 per piece)

The model never attends across segment ids, and `next_token_targets` never asks a token to
predict the first token of the next segment.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import grain
import jax.numpy as jnp
import numpy as np

from l4jax.config import Llama4Config
from l4jax.inputs import check_token_ids, check_tokenizer

log = logging.getLogger(__name__)

LLAMA4_VOCAB = 202048


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus Llama 4's chat special tokens, with the encode/decode
    surface of `l4jax.tokenizer.Tokenizer`; for small-vocab models (`tiny`, `demo`: vocab 512).

    The specials carry Llama 4's names (`special_tokens`), so chats render in the Llama 4 chat
    format (`pipelines.chat`) on these models too; `decode` drops them (bytes only).
    """

    bos_id, eos_id, pad_id = 256, 257, 258
    header_start_id, header_end_id, eom_id, eot_id = 259, 260, 261, 262
    n_words = 263
    special_tokens = {
        "<|begin_of_text|>": 256,
        "<|end_of_text|>": 257,
        "<|finetune_right_pad|>": 258,
        "<|header_start|>": 259,
        "<|header_end|>": 260,
        "<|eom|>": 261,
        "<|eot|>": 262,
    }

    @property
    def vocab_size(self) -> int:
        return self.n_words

    @property
    def stop_tokens(self) -> list[int]:
        return [self.eos_id, self.eom_id, self.eot_id]

    def encode(self, s: str, *, bos: bool = False, eos: bool = False, **_: object) -> list[int]:
        ids = list(s.encode("utf-8"))
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(n_words={self.n_words})"


def tokenizer_for(config: Llama4Config, path: str | None = None):
    """The tokenizer for a model: `path` if given, the Llama 4 tokenizer for a full-size
    vocab, else bytes (with a log line saying so)."""
    from l4jax.tokenizer import Tokenizer

    if path is not None:
        tokenizer = Tokenizer.from_pretrained(path)
    elif config.vocab_size >= LLAMA4_VOCAB:
        tokenizer = Tokenizer.default()
    else:
        tokenizer = ByteTokenizer()
        log.warning(
            "vocab_size %d is smaller than the Llama 4 tokenizer's %d ids: using the byte-level "
            "tokenizer (256 bytes + Llama 4's chat special tokens)",
            config.vocab_size,
            LLAMA4_VOCAB,
        )
    check_tokenizer(tokenizer, config.vocab_size)
    return tokenizer


class Tokenize(grain.transforms.Map):
    """document text -> {"tokens": int32 [n]} with bos/eos around each document."""

    def __init__(
        self, tokenizer, bos: bool = True, eos: bool = True, vocab_size: int | None = None
    ):
        self.tokenizer, self.bos, self.eos = tokenizer, bos, eos
        self.vocab_size = vocab_size  # ids outside [0, vocab_size) raise (a checked entry point)

    def map(self, text: str) -> dict[str, np.ndarray]:
        ids = np.asarray(self.tokenizer.encode(text, bos=self.bos, eos=self.eos))
        if self.vocab_size is not None:
            check_token_ids(
                ids, self.vocab_size, f"data: a document tokenized by {self.tokenizer!r}"
            )
        return {"tokens": ids.astype(np.int32)}


def _rename(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "tokens": row["tokens"],
        "segment_ids": row["tokens_segment_ids"],
        "positions": row["tokens_positions"],
    }


def pack(ds: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    """Concat-then-split documents into rows of `seq_len` (tokens, segment_ids, positions)."""
    packed = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len})
    return packed.map(_rename)


def next_token_targets(tokens_bt, segment_ids_bt):
    """targets [B, T] (the next token) and weights [B, T] float32 (1 where the next token is in
    the same, non-padding segment). Works on numpy and jax arrays alike."""
    xp = np if isinstance(tokens_bt, np.ndarray) else jnp
    targets = xp.concatenate([tokens_bt[:, 1:], xp.zeros_like(tokens_bt[:, :1])], axis=1)
    same = (segment_ids_bt[:, 1:] == segment_ids_bt[:, :-1]) & (segment_ids_bt[:, :-1] != 0)
    weights = xp.concatenate([same, xp.zeros_like(same[:, :1])], axis=1)
    return targets, weights.astype(xp.float32)
