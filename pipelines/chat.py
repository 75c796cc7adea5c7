"""Chat data for post-training: Llama 4 chat rendering with a loss mask, JSONL rows, batches.

Rendering follows `l4jax.tokenizer.Tokenizer.encode_dialog_prompt` / `encode_message` token for
token (tests/test_post.py re-tokenizes to check), in one pass that also builds the loss mask:

    <|begin_of_text|>                                                     mask 0
    <|header_start|>system<|header_end|>\\n\\n  You are ...  <|eot|>        mask 0 (every token)
    <|header_start|>user<|header_end|>\\n\\n    What is ...  <|eot|>        mask 0
    <|header_start|>assistant<|header_end|>\\n\\n                          mask 0 (the header)
                                              It is ...   <|eot|>         mask 1 (content + end)

The mask marks the tokens to be *predicted* (assistant content and its `<|eot|>`/`<|eom|>`),
and comes from the message structure, never from matching token ids. The loss weight of the
prediction made at position t is `mask[t + 1]` (`target_weights`).

Batches (numpy, [B, T] int32 each; this host's rows):
- sft: `tokens`, `segment_ids`, `positions`, `loss_mask`: whole conversations first-fit packed
  (Grain `FirstFitPackIterDataset`, segments never split); a conversation longer than T keeps
  its first T tokens (the cut-off end is not trained on).
- dpo: `chosen_*` and `rejected_*` versions of the four arrays, one pair per row, padded; when
  prompt + completion exceeds T the prompt loses tokens from its start (its first token, the
  `<|begin_of_text|>`, is kept), then the completion's end is cut.
- grpo: prompt rows (`rows_for_prompts`, left-padded by `l4jax.generate`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from l4jax.errors import ConfigError

ROLES = ("system", "user", "assistant", "ipython", "tool")
Messages = list[dict[str, str]]


# ---- rendering -------------------------------------------------------------------------------


def _special(tokenizer: Any, name: str) -> int:
    try:
        return tokenizer.special_tokens[name]
    except (AttributeError, KeyError):
        raise ConfigError(f"tokenizer {tokenizer!r} has no special token {name}") from None


def header_ids(tokenizer: Any, role: str) -> list[int]:
    """`<|header_start|>role<|header_end|>\\n\\n` (role `tool` is written `ipython`)."""
    name = "ipython" if role == "tool" else role
    return [
        _special(tokenizer, "<|header_start|>"),
        *tokenizer.encode(name, bos=False, eos=False),
        _special(tokenizer, "<|header_end|>"),
        *tokenizer.encode("\n\n", bos=False, eos=False),
    ]


def render_chat(
    tokenizer: Any, messages: Messages, *, open_assistant: bool = False
) -> tuple[list[int], list[bool]]:
    """(ids, mask): the dialog in Llama 4's chat format, mask True on assistant content and its
    end token. `open_assistant`: end with an open assistant header (a prompt to complete)."""
    ids = [_special(tokenizer, "<|begin_of_text|>")]
    mask = [False]
    eot, eom = _special(tokenizer, "<|eot|>"), _special(tokenizer, "<|eom|>")
    for message in messages:
        role = message["role"]
        header = header_ids(tokenizer, role)
        ids += header
        mask += [False] * len(header)
        body = tokenizer.encode(message["content"], bos=False, eos=False)
        end = eom if role in ("ipython", "tool") else eot
        body.append(end)
        ids += body
        mask += [role == "assistant"] * len(body)
    if open_assistant:
        header = header_ids(tokenizer, "assistant")
        ids += header
        mask += [False] * len(header)
    return ids, mask


def completion_ids(tokenizer: Any, text: str) -> list[int]:
    """An assistant reply after an open assistant header: its text and `<|eot|>`."""
    return [*tokenizer.encode(text, bos=False, eos=False), _special(tokenizer, "<|eot|>")]


def target_weights(loss_mask_bt: np.ndarray, weights_bt: Any) -> Any:
    """Weights of next-token predictions: `weights_bt` (same segment, from `next_token_targets`)
    times the mask of the predicted token (`loss_mask[t + 1]`). numpy or jax arrays."""
    xp = np if isinstance(loss_mask_bt, np.ndarray) else __import__("jax").numpy
    shifted = xp.concatenate([loss_mask_bt[:, 1:], xp.zeros_like(loss_mask_bt[:, :1])], axis=1)
    return weights_bt * shifted.astype(weights_bt.dtype)


# ---- JSONL rows ------------------------------------------------------------------------------


class JsonRows:
    """A Grain random-access source of JSON objects, one per non-empty line of JSONL files;
    `check(record, where)` validates each row (`where` is "file:line")."""

    def __init__(self, paths: Sequence[str | os.PathLike], check=None):
        self.paths = [str(p) for p in paths]
        self.check = check
        self._lines: list[tuple[int, int, int]] = []  # (file index, byte offset, line number)
        for i, path in enumerate(self.paths):
            if not os.path.isfile(path):
                raise ConfigError(f"--data {path}: no such file")
            offset = 0
            with open(path, "rb") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        self._lines.append((i, offset, number))
                    offset += len(line)
        if not self._lines:
            raise ConfigError(f"--data {', '.join(self.paths)}: no rows")

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, index: int) -> dict[str, Any]:
        file_index, offset, number = self._lines[index]
        where = f"{self.paths[file_index]}:{number}"
        with open(self.paths[file_index], "rb") as f:
            f.seek(offset)
            line = f.readline()
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: a row must be a JSON object")
        if self.check is not None:
            self.check(record, where)
        return record

    def __repr__(self) -> str:
        return f"JsonRows({self.paths}, {len(self)} rows)"


class ListRows:
    """Rows held in memory (the built-in demo sets), the same interface as `JsonRows`."""

    def __init__(self, rows: list[dict[str, Any]], name: str):
        self.rows, self.name = rows, name

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]

    def __repr__(self) -> str:
        return f"ListRows({self.name}, {len(self)} rows)"


def check_messages(messages: Any, where: str, field: str = "messages") -> None:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: {field!r} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ConfigError(f"{where}: {field}[{i}].role must be one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: {field}[{i}].content must be a string")


def prompt_messages(prompt: Any, where: str) -> Messages:
    """A row's `prompt`: a string (one user turn) or a list of messages."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    check_messages(prompt, where, "prompt")
    return prompt


def check_sft(record: dict[str, Any], where: str) -> None:
    check_messages(record.get("messages"), where)


def check_dpo(record: dict[str, Any], where: str) -> None:
    prompt_messages(record.get("prompt"), where)
    for name in ("chosen", "rejected"):
        if not isinstance(record.get(name), str):
            raise ConfigError(f"{where}: {name!r} must be a string")


def check_grpo(record: dict[str, Any], where: str) -> None:
    prompt_messages(record.get("prompt"), where)


CHECKS = {"sft": check_sft, "dpo": check_dpo, "grpo": check_grpo}


def open_rows(path: str | os.PathLike, task: str) -> JsonRows:
    """The JSONL rows of `path` (a file, or a directory of .jsonl files) for `task`."""
    p = str(path)
    if os.path.isdir(p):
        files = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".jsonl"))
        if not files:
            raise ConfigError(f"--data {p}: no .jsonl files inside")
    else:
        files = [p]
    return JsonRows(files, CHECKS[task])


# ---- per-row transforms ----------------------------------------------------------------------


class RenderSFT(grain.transforms.Map):
    """{"messages"} -> {"tokens", "loss_mask"} int32 [n], cut to `seq_len` tokens."""

    def __init__(self, tokenizer: Any, seq_len: int):
        self.tokenizer, self.seq_len = tokenizer, seq_len

    def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        ids, mask = render_chat(self.tokenizer, record["messages"])
        return {
            "tokens": np.asarray(ids[: self.seq_len], np.int32),
            "loss_mask": np.asarray(mask[: self.seq_len], np.int32),
        }


def fit_pair(prompt: list[int], completion: list[int], seq_len: int) -> tuple[list[int], int]:
    """(ids, prompt length) of prompt + completion in `seq_len`: the prompt loses tokens after
    its first (`<|begin_of_text|>`) first, then the completion's end is cut."""
    over = len(prompt) + len(completion) - seq_len
    if over > 0:
        cut = min(over, len(prompt) - 1)
        prompt = prompt[:1] + prompt[1 + cut :]
    return (prompt + completion)[:seq_len], len(prompt)


def padded_row(ids: list[int], n_prompt: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One unpacked row: tokens, segment_ids (1, then 0 on padding), positions, loss_mask (1 on
    the completion)."""
    n = len(ids)
    tokens = np.full(seq_len, pad_id, np.int32)
    tokens[:n] = ids
    segments = (np.arange(seq_len) < n).astype(np.int32)
    positions = np.where(segments > 0, np.arange(seq_len), 0).astype(np.int32)
    mask = ((np.arange(seq_len) >= n_prompt) & (segments > 0)).astype(np.int32)
    return {"tokens": tokens, "segment_ids": segments, "positions": positions, "loss_mask": mask}


class RenderDPO(grain.transforms.Map):
    """{"prompt", "chosen", "rejected"} -> chosen_* and rejected_* rows [T]."""

    def __init__(self, tokenizer: Any, seq_len: int):
        self.tokenizer, self.seq_len = tokenizer, seq_len

    def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        messages = prompt_messages(record["prompt"], "row")
        prompt, _ = render_chat(self.tokenizer, messages, open_assistant=True)
        out = {}
        for name in ("chosen", "rejected"):
            ids, n_prompt = fit_pair(
                prompt, completion_ids(self.tokenizer, record[name]), self.seq_len
            )
            row = padded_row(ids, n_prompt, self.seq_len, self.tokenizer.pad_id)
            out.update({f"{name}_{k}": v for k, v in row.items()})
        return out


def _pack_rename(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "tokens": row["tokens"],
        "segment_ids": row["tokens_segment_ids"],
        "positions": row["tokens_positions"],
        "loss_mask": row["loss_mask"],
    }


def make_task_dataset(
    task: str,
    rows: Any,
    tokenizer: Any,
    seq_len: int,
    global_batch: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 2,
) -> grain.IterDataset:
    """The infinite, checkpointable dataset of this host's batches for `task` (sft, dpo, grpo:
    grpo batches are lists of rows, the prompts of one step)."""
    if global_batch % process_count:
        raise ConfigError(f"batch size {global_batch} is not divisible by {process_count} hosts")
    if len(rows) < process_count:
        raise ConfigError(f"data: {len(rows)} rows for {process_count} processes")
    local = global_batch // process_count
    ds = grain.MapDataset.source(rows)[process_index::process_count]
    ds = ds.shuffle(seed=seed).repeat(None)
    if task == "sft":
        it = ds.map(RenderSFT(tokenizer, seq_len)).to_iter_dataset()
        it = grain.experimental.FirstFitPackIterDataset(
            it,
            length_struct={"tokens": seq_len, "loss_mask": seq_len},
            num_packing_bins=local,
            shuffle_bins=False,
        ).map(_pack_rename)
        batches = it.batch(local, drop_remainder=True)
    elif task == "dpo":
        batches = ds.map(RenderDPO(tokenizer, seq_len)).batch(local).to_iter_dataset()
    elif task == "grpo":
        batches = ds.batch(local, batch_fn=list).to_iter_dataset()
    else:
        raise ConfigError(f"no dataset for task {task!r}")
    if prefetch > 0 and task != "grpo":
        batches = grain.experimental.ThreadPrefetchIterDataset(
            batches, prefetch_buffer_size=prefetch
        )
    return batches
