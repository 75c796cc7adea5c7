"""Llama 4 tokenizer and text chat format, token-for-token identical to Meta's reference.

Mirrors ``llama_models.llama4.tokenizer.Tokenizer`` (tiktoken BPE with 200000 ranks plus 2048
special tokens) and the text part of ``llama_models.llama4.chat_format.ChatFormat``, without
torch and without importing ``llama_models``. Two file formats are read: Meta's
``tokenizer.model`` (tiktoken ranks) and a Hugging Face ``tokenizer.json``.

Chat messages carry text only; image content needs l4jax vision support and is rejected.
Unreadable tokenizer files raise ``l4jax.errors.CheckpointError`` (a ValueError) naming the path.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import importlib.resources
import json
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tiktoken
import tiktoken.load
import tokenizers

from l4jax.errors import CheckpointError

# Meta encodes at most this many characters per tiktoken call (tiktoken panics beyond ~400k) ...
MAX_ENCODE_CHARS = 400_000
# ... and cuts runs of whitespace / non-whitespace longer than this (tiktoken issue #195).
MAX_RUN_CHARS = 25_000
NUM_RESERVED_SPECIAL_TOKENS = 2048

# Llama 4's pre-tokenizer split pattern (Meta's ``Tokenizer.O200K_PATTERN``).
SPLIT_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

Role = Literal["system", "user", "assistant", "ipython", "tool"]
StopReason = Literal["end_of_turn", "end_of_message", "out_of_tokens"]
ToolPromptFormat = Literal["json", "function_tag", "python_list"]
Content = str | Sequence[str]
OrdinaryEncoder = Callable[[str], list[int]]

_BUILTIN_QUERY_TOOLS = ("brave_search", "wolfram_alpha", "photogen")


def _reserved(name: str, count: int, start: int = 0) -> list[str]:
    return [f"<|{name}_reserved_special_token_{i}|>" for i in range(start, start + count)]


def llama4_special_tokens() -> list[str]:
    """The 2048 special token strings in id order (ids start right after the BPE ranks)."""
    tokens = [
        *["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>"],
        *["<|fim_suffix|>", "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"],
        *_reserved("text_post_train", 6),
        *["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"],
        *_reserved("text_post_train", 61, 8),
        *["<|image_start|>", "<|image_end|>", *_reserved("vision", 2)],
        *["<|tile_x_separator|>", "<|tile_y_separator|>", *_reserved("vision", 4, 2)],
        *["<|image|>", *_reserved("vision", 1, 6), "<|patch|>", *_reserved("vision", 1041, 7)],
        *_reserved("reasoning", 8),
        *["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"],
    ]
    n_rest = NUM_RESERVED_SPECIAL_TOKENS - len(tokens)
    return tokens + [f"<|reserved_special_token_{i}|>" for i in range(n_rest)]


@dataclass(frozen=True)
class ToolCall:
    """A tool call made by the assistant.

    ``tool_name`` ``brave_search``/``wolfram_alpha``/``photogen`` (``arguments["query"]``) and
    ``code_interpreter`` (``arguments["code"]``) are Meta's builtin tools; any other name is a
    custom tool serialized according to the dialog's ``tool_prompt_format``.
    """

    tool_name: str
    arguments: dict[str, Any] | str
    call_id: str = ""


@dataclass(frozen=True)
class Message:
    """One chat message (text only). ``role="tool"`` is an alias of ``"ipython"``.

    ``content`` is a string or a sequence of text pieces (each piece is tokenized separately,
    as Meta does for a list of text items). ``context`` is user-message RAG context.
    """

    role: Role
    content: Content
    stop_reason: StopReason | None = None
    tool_calls: Sequence[ToolCall] = ()
    context: Content | None = None


class Tokenizer:
    """Llama 4 tokenizer with Meta's ``Tokenizer`` API plus the text chat format."""

    def __init__(
        self,
        encode_ordinary: OrdinaryEncoder,
        token_bytes: dict[int, bytes],
        special_tokens: dict[str, int],
        source: str,
    ) -> None:
        """Low-level constructor; use ``from_pretrained`` or ``default`` instead.

        ``encode_ordinary`` maps text without special tokens to ids; ``token_bytes`` maps every
        id (special ones included) to its bytes.
        """
        self._encode_ordinary = encode_ordinary
        self._token_bytes = token_bytes
        self.special_tokens = special_tokens
        self._special_set = frozenset(special_tokens)
        self.source = source
        self.n_words: int = len(token_bytes)
        self.bos_id = self._special_id("<|begin_of_text|>")
        self.eos_id = self._special_id("<|end_of_text|>")
        self.pad_id = self._special_id("<|finetune_right_pad|>")
        self.eot_id = self._special_id("<|eot|>")
        self.eom_id = self._special_id("<|eom|>")
        self.thinking_start_id = self._special_id("<|reasoning_thinking_start|>")
        self.thinking_end_id = self._special_id("<|reasoning_thinking_end|>")
        self.stop_tokens: list[int] = [self.eos_id, self.eom_id, self.eot_id]

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, n_words={self.n_words})"

    @property
    def vocab_size(self) -> int:
        return self.n_words

    def _special_id(self, token: str) -> int:
        if token not in self.special_tokens:
            raise CheckpointError(f"{self.source}: special token {token} is missing")
        return self.special_tokens[token]

    # ----------------------------------------------------------------------- constructors

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load from a checkpoint directory, a ``tokenizer.model`` or a ``tokenizer.json``.

        A directory is searched for ``tokenizer.model`` first, then ``tokenizer.json``.
        """
        path = Path(path)
        if path.is_dir():
            path = _find_tokenizer_file(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        if _looks_like_json(path):
            return cls.from_hf_json(path)
        return cls.from_tiktoken(path)

    @classmethod
    def from_tiktoken(cls, path: str | Path) -> Tokenizer:
        """Load Meta's ``tokenizer.model`` (base64 token + rank per line)."""
        ranks = _load_ranks(Path(path))
        special = {tok: len(ranks) + i for i, tok in enumerate(llama4_special_tokens())}
        model = tiktoken.Encoding(
            name=Path(path).name, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={}
        )
        token_bytes = {rank: tok for tok, rank in ranks.items()}
        token_bytes.update({i: tok.encode() for tok, i in special.items()})
        return cls(model.encode_ordinary, token_bytes, special, str(path))

    @classmethod
    def from_hf_json(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face byte-level BPE ``tokenizer.json`` with the tokenizers library."""
        hf = _load_hf(Path(path))
        added = hf.get_added_tokens_decoder()
        special = {tok.content: i for i, tok in added.items() if tok.special}
        token_bytes = _byte_level_vocab(hf.get_vocab(with_added_tokens=False), str(path))
        token_bytes.update({i: tok.content.encode() for i, tok in added.items()})

        def encode_ordinary(text: str) -> list[int]:
            return hf.encode(text, add_special_tokens=False).ids

        return cls(encode_ordinary, token_bytes, special, str(path))

    @classmethod
    def default(cls) -> Tokenizer:
        """The ``tokenizer.model`` shipped in the installed ``llama_models`` package."""
        try:
            ref = importlib.resources.files("llama_models").joinpath("llama4/tokenizer.model")
        except ModuleNotFoundError:
            raise FileNotFoundError(
                "Tokenizer.default() needs Meta's llama_models package: pip install llama-models"
            ) from None
        with importlib.resources.as_file(ref) as path:
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found; pip install llama-models")
            return cls.from_tiktoken(path)

    # ----------------------------------------------------------------------- encode / decode

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: Literal["all"] | AbstractSet[str] | None = None,
        disallowed_special: Literal["all"] | Collection[str] = (),
    ) -> list[int]:
        """Encode ``s`` to ids exactly as Meta's ``Tokenizer.encode``.

        By default special-token text is encoded as plain text. ``allowed_special`` ("all" or a
        set) turns those strings into special ids; text matching ``disallowed_special`` raises
        ValueError.
        """
        if not isinstance(s, str):
            raise TypeError(f"encode expects str, got {type(s).__name__}")
        allowed = self._special_set if allowed_special == "all" else self._allowed(allowed_special)
        if disallowed_special == "all":
            disallowed = self._special_set - allowed
        else:
            disallowed = frozenset(disallowed_special)
        ids = [self.bos_id] if bos else []
        for chunk in _meta_chunks(s):
            ids.extend(self._encode_chunk(chunk, allowed, disallowed))
        if eos:
            ids.append(self.eos_id)
        return ids

    def _allowed(self, allowed_special: AbstractSet[str] | None) -> frozenset[str]:
        return frozenset(allowed_special or ()) & self._special_set

    def _encode_chunk(
        self, text: str, allowed: frozenset[str], disallowed: frozenset[str]
    ) -> list[int]:
        if disallowed and (match := _literal_regex(disallowed).search(text)):
            raise ValueError(
                f"Encountered text corresponding to disallowed special token {match.group()!r}; "
                "pass allowed_special to encode it as a special token, or disallowed_special=() "
                "to encode it as normal text"
            )
        text = _valid_utf8(text)
        if not allowed:
            return self._encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for match in _literal_regex(allowed).finditer(text):
            ids.extend(self._encode_ordinary(text[start : match.start()]))
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        ids.extend(self._encode_ordinary(text[start:]))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text (invalid UTF-8 becomes U+FFFD, as in Meta's tokenizer)."""
        return b"".join(map(self._bytes_of, ids)).decode("utf-8", errors="replace")

    def decode_stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield text pieces as ids arrive, never splitting a multi-byte UTF-8 character.

        The pieces concatenate to ``decode(ids)``; ``ids`` may be a lazy generator.
        """
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token_id in ids:
            if piece := decoder.decode(self._bytes_of(token_id)):
                yield piece
        if tail := decoder.decode(b"", final=True):
            yield tail

    def _bytes_of(self, token_id: int) -> bytes:
        try:
            return self._token_bytes[int(token_id)]
        except KeyError:
            raise ValueError(
                f"token id {token_id} is not in the vocabulary (size {self.n_words})"
            ) from None

    # ----------------------------------------------------------------------- chat format

    def encode_header(self, role: str) -> list[int]:
        """``<|header_start|>role<|header_end|>\\n\\n`` (role ``tool`` is written ``ipython``)."""
        name = "ipython" if role == "tool" else role
        return [
            self.special_tokens["<|header_start|>"],
            *self.encode(name, bos=False, eos=False),
            self.special_tokens["<|header_end|>"],
            *self.encode("\n\n", bos=False, eos=False),
        ]

    def encode_content(self, content: Content) -> list[int]:
        """Meta's ``ChatFormat.encode_content`` tokens: ``<|begin_of_text|>`` + the text."""
        return self._encode_content(content, bos=True)

    def _encode_content(self, content: Content, bos: bool = False) -> list[int]:
        ids: list[int] = []
        for i, piece in enumerate(_text_pieces(content)):
            ids.extend(self.encode(piece, bos=bos and i == 0, eos=False))
        return ids

    def encode_message(
        self, message: Message, tool_prompt_format: ToolPromptFormat = "json"
    ) -> list[int]:
        """Header, content, user context, assistant tool calls, then ``<|eom|>``/``<|eot|>``."""
        ids = self.encode_header(message.role)
        ids.extend(self._encode_content(message.content))
        if message.role == "user" and message.context is not None:
            ids.extend(self._encode_content("\n\n"))
            ids.extend(self._encode_content(message.context))
        if message.role == "assistant":
            for call in message.tool_calls:
                ids.extend(self._encode_content(tool_call_text(call, tool_prompt_format)))
        ids.append(self.eom_id if _ends_with_eom(message) else self.eot_id)
        return ids

    def encode_dialog_prompt(
        self, messages: Sequence[Message], tool_prompt_format: ToolPromptFormat = "json"
    ) -> list[int]:
        """``<|begin_of_text|>``, every message, then an open assistant header to complete."""
        ids = [self.bos_id]
        for message in messages:
            ids.extend(self.encode_message(message, tool_prompt_format))
        ids.extend(self.encode_header("assistant"))
        return ids


# --------------------------------------------------------------------------- chat helpers


def _text_pieces(content: Content) -> list[str]:
    pieces = [content] if isinstance(content, str) else list(content)
    for piece in pieces:
        if not isinstance(piece, str):
            raise TypeError(
                f"only text message content is supported, got {type(piece).__name__} "
                "(image content needs l4jax vision support)"
            )
    return pieces


def _ends_with_eom(message: Message) -> bool:
    if message.role == "assistant":
        return message.stop_reason == "end_of_message" or bool(message.tool_calls)
    return message.role in ("ipython", "tool")


def tool_call_text(call: ToolCall, tool_prompt_format: ToolPromptFormat) -> str:
    """Serialize a tool call as Meta's ``ToolUtils.encode_tool_call`` does."""
    name, args = call.tool_name, call.arguments
    if name in _BUILTIN_QUERY_TOOLS:
        return f'{name}.call(query="{args["query"]}")'
    if name == "code_interpreter":
        return args["code"]
    if tool_prompt_format == "json":
        return json.dumps({"type": "function", "name": name, "parameters": args})
    if tool_prompt_format == "function_tag":
        return f"<function={name}>{json.dumps(args)}</function>"
    if tool_prompt_format == "python_list":
        args_str = ", ".join(f"{k}={_python_value(v)}" for k, v in args.items())
        return f"[{name}({args_str})]"
    raise ValueError(f"Unsupported tool prompt format: {tool_prompt_format}")


def _python_value(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (int, float, bool)) or value is None:
        return str(value)
    if isinstance(value, list):
        return f"[{', '.join(_python_value(v) for v in value)}]"
    if isinstance(value, dict):
        return f"{{{', '.join(f'{k}={_python_value(v)}' for k, v in value.items())}}}"
    raise ValueError(f"Unsupported type: {type(value)}")


# --------------------------------------------------------------------------- encoding helpers


def _meta_chunks(s: str) -> Iterator[str]:
    """Meta's pieces: 400k-char slices, each cut inside whitespace/non-whitespace runs."""
    for i in range(0, len(s), MAX_ENCODE_CHARS):
        yield from _split_long_runs(s[i : i + MAX_ENCODE_CHARS], MAX_RUN_CHARS)


@functools.lru_cache(maxsize=8)
def _long_run_regex(max_run: int) -> re.Pattern[str]:
    # Matches only at run starts (look-behind), so scanning stays linear. re's \s is exactly
    # str.isspace(), which Meta's splitter uses.
    n = max_run + 1
    return re.compile(rf"(?<!\S)\S{{{n},}}|(?<!\s)\s{{{n},}}")


def _split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """Same output as Meta's ``Tokenizer._split_whitespaces_or_nonwhitespaces``."""
    start = 0
    for run in _long_run_regex(max_run).finditer(s):
        for cut in range(run.start() + max_run, run.end(), max_run):
            yield s[start:cut]
            start = cut
    yield s[start:]


@functools.lru_cache(maxsize=64)
def _literal_regex(literals: frozenset[str]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(t) for t in sorted(literals, key=len, reverse=True)))


def _valid_utf8(text: str) -> str:
    """Replace lone surrogates the way tiktoken does (surrogate pairs become one character)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


# --------------------------------------------------------------------------- file loading


def _find_tokenizer_file(directory: Path) -> Path:
    for name in ("tokenizer.model", "tokenizer.json"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {directory}")


def _looks_like_json(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4096).lstrip().startswith(b"{")


def _load_ranks(path: Path) -> dict[bytes, int]:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    # tiktoken caches by path name; the content hash keeps a replaced file from reading stale.
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        ranks = tiktoken.load.load_tiktoken_bpe(str(path), expected_hash=digest)
    except ValueError as e:
        raise CheckpointError(
            f"{path} is neither a tiktoken BPE file (tokenizer.model) nor a tokenizer.json"
        ) from e
    if not ranks:
        raise CheckpointError(f"{path} holds no BPE ranks")
    return ranks


def _load_hf(path: Path) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        hf = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception
        raise CheckpointError(f"{path} is not a valid Hugging Face tokenizer.json: {e}") from e
    hf.encode_special_tokens = True  # special-token text is plain text unless allowed
    hf.no_truncation()
    hf.no_padding()
    return hf


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` used by byte-level BPE vocabularies."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(shifted)}


def _byte_level_vocab(vocab: dict[str, int], source: str) -> dict[int, bytes]:
    alphabet = _byte_level_alphabet()
    try:
        return {i: bytes(alphabet[c] for c in token) for token, i in vocab.items()}
    except KeyError as e:
        raise CheckpointError(
            f"{source} is not a byte-level BPE tokenizer ({e.args[0]!r})"
        ) from None
