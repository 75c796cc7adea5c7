"""l4jax.tokenizer against Meta's reference Tokenizer / ChatFormat (llama_models.llama4)."""

from __future__ import annotations

import itertools
import random
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from l4jax.errors import CheckpointError
from l4jax.tokenizer import (
    SPLIT_PATTERN,
    Message,
    Tokenizer,
    ToolCall,
    _split_long_runs,
    llama4_special_tokens,
)

meta_tokenizer = pytest.importorskip("llama_models.llama4.tokenizer")
META_MODEL = Path(meta_tokenizer.__file__).parent / "tokenizer.model"

CORPUS = [
    "",
    " ",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café résumé Ångström Übergrößenträger São Paulo",
    "你好，世界！这是一个测试。日本語のテキスト、カタカナ。한국어 텍스트",
    "Привет, мир! مرحبا بالعالم हिन्दी ελληνικά",
    "emoji 🤗🦙👩‍👩‍👧‍👦 🇫🇷 ✨ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "combining e\u0301 zero\u200bwidth nbsp\u00a0ideographic\u3000space",
    'def f(x: int) -> int:\n\treturn x ** 2  # square\n\nprint(f"{f(3)=}")\n',
    "  leading and trailing  \n\n\n\t\t x \r\n y \r\r\n",
    "numbers 1234567890 3.14159 -1e-10 0x1F 1,000,000",
    "I'm you're they've WE'LL She'd IT'S",
    "<|begin_of_text|>not special by default<|eot|> <|header_start|>user<|header_end|>",
    " " * 30_000,
    "x" * 60_001,
    "ab " * 10 + " " * 25_001 + "tail" + "\n" * 25_005 + "end",
    "lone surrogate a\ud800b and a pair \ud83d\ude00",
]
ROUND_TRIP = [text for text in CORPUS if "\ud800" not in text]  # lone surrogates are replaced
SPECIAL_TEXT = "<|begin_of_text|>hi<|eot|>\n<|header_start|>user<|header_end|><|image|><|patch|>x"


@pytest.fixture(scope="module")
def meta() -> Any:
    return meta_tokenizer.Tokenizer(META_MODEL)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory: pytest.TempPathFactory, meta: Any) -> Path:
    """A tokenizer.json converted offline from the real tokenizer.model by transformers."""
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    converter = convert.TikTokenConverter(
        vocab_file=str(META_MODEL),
        pattern=meta.O200K_PATTERN,
        extra_special_tokens=list(meta.special_tokens),
    )
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    converter.converted().save(str(path))
    return path


@pytest.fixture(scope="module")
def hf_tok(hf_json: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(hf_json)


# --------------------------------------------------------------------------- vocabulary


def test_vocabulary_matches_meta(tok: Tokenizer, meta: Any) -> None:
    assert SPLIT_PATTERN == meta.O200K_PATTERN
    assert tok.special_tokens == meta.special_tokens
    assert list(tok.special_tokens) == llama4_special_tokens()
    assert tok.n_words == tok.vocab_size == meta.n_words == 202_048
    for attr in ("bos_id", "eos_id", "eot_id", "eom_id", "pad_id", "stop_tokens"):
        assert getattr(tok, attr) == getattr(meta, attr), attr
    assert (tok.thinking_start_id, tok.thinking_end_id) == (
        meta.thinking_start_id,
        meta.thinking_end_id,
    )


# --------------------------------------------------------------------------- encode


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_encode_matches_meta(tok: Tokenizer, meta: Any, text: str) -> None:
    for bos, eos in itertools.product([False, True], repeat=2):
        assert tok.encode(text, bos=bos, eos=eos) == meta.encode(text, bos=bos, eos=eos)


def test_encode_over_400k_chars_matches_meta(tok: Tokenizer, meta: Any) -> None:
    text = "abcde " * 70_000  # the 400k-char cut falls inside a word
    assert tok.encode(text, bos=True, eos=True) == meta.encode(text, bos=True, eos=True)


@pytest.mark.parametrize(
    "allowed",
    ["all", {"<|eot|>"}, {"<|header_start|>", "<|header_end|>", "<|image|>"}, {"not-special"}],
)
def test_allowed_special_matches_meta(tok: Tokenizer, meta: Any, allowed: Any) -> None:
    ours = tok.encode(SPECIAL_TEXT, bos=False, eos=False, allowed_special=allowed)
    assert ours == meta.encode(SPECIAL_TEXT, bos=False, eos=False, allowed_special=allowed)


def test_special_text_is_plain_by_default(tok: Tokenizer) -> None:
    ids = tok.encode(SPECIAL_TEXT, bos=False, eos=False)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.encode("<|eot|>", bos=False, eos=False, allowed_special="all") == [tok.eot_id]


@pytest.mark.parametrize(
    ("allowed", "disallowed"),
    [(None, "all"), ({"<|eot|>"}, "all"), (None, {"<|patch|>"}), ("all", {"x"})],
)
def test_disallowed_special_raises_like_meta(
    tok: Tokenizer, meta: Any, allowed: Any, disallowed: Any
) -> None:
    kwargs = {"bos": False, "eos": False, "allowed_special": allowed}
    with pytest.raises(ValueError):
        meta.encode(SPECIAL_TEXT, **kwargs, disallowed_special=disallowed)
    with pytest.raises(ValueError, match="disallowed special token"):
        tok.encode(SPECIAL_TEXT, **kwargs, disallowed_special=disallowed)


def test_disallowed_all_accepts_plain_text(tok: Tokenizer, meta: Any) -> None:
    text = CORPUS[5]
    expected = meta.encode(text, bos=False, eos=False, disallowed_special="all")
    assert tok.encode(text, bos=False, eos=False, disallowed_special="all") == expected


def test_encode_rejects_non_str(tok: Tokenizer) -> None:
    with pytest.raises(TypeError):
        tok.encode(b"bytes", bos=False, eos=False)  # type: ignore[arg-type]


def test_run_splitting_matches_meta() -> None:
    rng = random.Random(0)
    alphabet = ["a", "é", "漢", " ", "\n", "\t", "\u00a0", "\u3000"]
    for _ in range(400):
        text = "".join(rng.choices(alphabet, k=rng.randrange(40)))
        max_run = rng.randrange(1, 6)
        expected = list(
            meta_tokenizer.Tokenizer._split_whitespaces_or_nonwhitespaces(text, max_run)
        )
        assert list(_split_long_runs(text, max_run)) == expected, (text, max_run)


# --------------------------------------------------------------------------- decode


@pytest.mark.parametrize("text", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_decode_round_trip(tok: Tokenizer, meta: Any, text: str) -> None:
    ids = tok.encode(text, bos=True, eos=True)
    assert tok.decode(ids) == meta.decode(ids) == f"<|begin_of_text|>{text}<|end_of_text|>"


def test_decode_special_and_invalid_bytes_like_meta(tok: Tokenizer, meta: Any) -> None:
    lone_byte = meta.model.encode_single_token(b"\xe4")
    ids = [tok.eot_id, lone_byte, *tok.encode("ok", bos=False, eos=False), lone_byte]
    assert tok.decode(ids) == meta.decode(ids) == "<|eot|>\ufffdok\ufffd"
    assert "".join(tok.decode_stream(ids)) == tok.decode(ids)


def test_decode_stream_keeps_characters_whole(tok: Tokenizer) -> None:
    text = "Streaming 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦙👩‍👩‍👧‍👦 漢字 façade"
    ids = tok.encode(text, bos=False, eos=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some ids split a character
    pieces = list(tok.decode_stream(iter(ids)))
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_decode_unknown_id_raises(tok: Tokenizer) -> None:
    for bad in (-1, tok.n_words):
        with pytest.raises(ValueError, match="not in the vocabulary"):
            tok.decode([bad])


# --------------------------------------------------------------------------- chat format


@pytest.fixture(scope="module")
def meta_chat(meta: Any) -> Any:
    """Meta's ChatFormat; its image-only torchvision import is stubbed out when missing."""
    pytest.importorskip("torch", reason="Meta's chat_format imports torch")
    try:
        from llama_models.llama4 import chat_format
    except ModuleNotFoundError as e:
        if e.name != "torchvision":
            raise
        stub = types.ModuleType("llama_models.llama4.preprocess")
        stub.ResizeNormalizeImageTransform = stub.VariableSizeImageTransform = None
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(sys.modules, stub.__name__, stub)
            from llama_models.llama4 import chat_format
    return chat_format.ChatFormat(meta)


def to_meta_message(message: Message) -> Any:
    from llama_models import datatypes as dt

    def content(c: Any) -> Any:
        return c if c is None or isinstance(c, str) else [dt.RawTextItem(text=t) for t in c]

    calls = [
        dt.ToolCall(call_id=c.call_id or "id", tool_name=c.tool_name, arguments=c.arguments)
        for c in message.tool_calls
    ]
    return dt.RawMessage(
        role="tool" if message.role == "ipython" else message.role,
        content=content(message.content),
        context=content(message.context),
        stop_reason=dt.StopReason(message.stop_reason) if message.stop_reason else None,
        tool_calls=calls,
    )


WEATHER = ToolCall(
    "get_weather",
    {"city": "Paris", "days": 3, "metric": True, "unit": None, "tags": ["a", "b"], "o": {"x": 1}},
    call_id="call-1",
)
DIALOGS = {
    "system_user": [
        Message("system", "You are a helpful assistant."),
        Message("user", "What is the capital of France?"),
    ],
    "multi_turn": [
        Message("system", "Answer briefly."),
        Message("user", "Capital of France?"),
        Message("assistant", "Paris.", stop_reason="end_of_turn"),
        Message("user", ["And of Japan? ", "日本 🗾"]),
        Message("assistant", "Tokyo.\n\n  ", stop_reason="out_of_tokens"),
        Message("user", "Thanks! <|eot|> is just text here."),
    ],
    "ipython_result": [
        Message("user", "Search the weather.", context="Paris is in France."),
        Message("assistant", "", tool_calls=[ToolCall("brave_search", {"query": "Paris"})]),
        Message("ipython", '{"temperature": 21}'),
        Message("assistant", "It is 21°C.", stop_reason="end_of_turn"),
    ],
    "custom_tool_call": [
        Message("system", "You can call get_weather."),
        Message("user", "Weather in Paris for 3 days?"),
        Message("assistant", "", tool_calls=[WEATHER]),
        Message("tool", "sunny"),
    ],
    "code_and_eom": [
        Message("user", "Compute 2**10."),
        Message(
            "assistant",
            "Let me run code.",
            tool_calls=[ToolCall("code_interpreter", {"code": "print(2**10)\n"})],
        ),
        Message("ipython", "1024"),
        Message("assistant", "Partial answer", stop_reason="end_of_message"),
        Message("assistant", "", tool_calls=[ToolCall("wolfram_alpha", {"query": "2^10"})]),
    ],
}


@pytest.mark.parametrize("fmt", ["json", "function_tag", "python_list"])
@pytest.mark.parametrize("name", DIALOGS)
def test_chat_format_matches_meta(tok: Tokenizer, meta_chat: Any, name: str, fmt: Any) -> None:
    from llama_models.datatypes import ToolPromptFormat

    dialog, meta_fmt = DIALOGS[name], ToolPromptFormat(fmt)
    meta_dialog = [to_meta_message(m) for m in dialog]
    expected = meta_chat.encode_dialog_prompt(meta_dialog, meta_fmt).tokens
    assert tok.encode_dialog_prompt(dialog, tool_prompt_format=fmt) == expected
    for ours, theirs in zip(dialog, meta_dialog, strict=True):
        assert tok.encode_message(ours, fmt) == meta_chat.encode_message(theirs, meta_fmt)[0]


def test_chat_pieces_match_meta(tok: Tokenizer, meta_chat: Any) -> None:
    for role in ("system", "user", "assistant", "ipython", "tool"):
        assert tok.encode_header(role) == meta_chat._encode_header(role)
    for content in ("Once upon a time", "", ["two ", "pieces"]):
        meta_content = (
            content
            if isinstance(content, str)
            else to_meta_message(Message("user", content)).content
        )
        assert tok.encode_content(content) == meta_chat.encode_content(meta_content).tokens


def test_stop_reasons(tok: Tokenizer) -> None:
    assert tok.encode_message(Message("assistant", "a"))[-1] == tok.eot_id
    assert tok.encode_message(Message("assistant", "a", "end_of_message"))[-1] == tok.eom_id
    assert tok.encode_message(Message("ipython", "r"))[-1] == tok.eom_id


def test_image_content_rejected(tok: Tokenizer) -> None:
    with pytest.raises(TypeError, match="vision support"):
        tok.encode_message(Message("user", ["text", b"\x89PNG"]))  # type: ignore[list-item]


# --------------------------------------------------------------------------- loading


def test_hf_tokenizer_json_matches_tiktoken(tok: Tokenizer, hf_tok: Tokenizer) -> None:
    assert hf_tok.special_tokens == tok.special_tokens
    assert hf_tok.n_words == tok.n_words
    for text in CORPUS:
        ids = tok.encode(text, bos=True, eos=False)
        assert hf_tok.encode(text, bos=True, eos=False) == ids, text[:40]
        assert hf_tok.decode(ids) == tok.decode(ids)
    for allowed in ("all", {"<|eot|>"}):
        kwargs = {"bos": False, "eos": True, "allowed_special": allowed}
        assert hf_tok.encode(SPECIAL_TEXT, **kwargs) == tok.encode(SPECIAL_TEXT, **kwargs)
    dialog = DIALOGS["custom_tool_call"]
    assert hf_tok.encode_dialog_prompt(dialog) == tok.encode_dialog_prompt(dialog)


def test_from_pretrained_directory(tmp_path: Path, tok: Tokenizer, hf_json: Path) -> None:
    (tmp_path / "tokenizer.model").symlink_to(META_MODEL)
    (tmp_path / "tokenizer.json").symlink_to(hf_json)
    from_dir = Tokenizer.from_pretrained(tmp_path)
    assert from_dir.source.endswith("tokenizer.model")
    assert from_dir.encode(CORPUS[4], bos=True, eos=True) == tok.encode(
        CORPUS[4], bos=True, eos=True
    )
    assert Tokenizer.from_pretrained(hf_json.parent).source == str(hf_json)


def test_missing_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.from_pretrained(tmp_path / "nope.model")


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("garbage.bin", b"\x00\xff not a tokenizer\n at all \x01"),
        ("empty.model", b""),
        ("broken.json", b'{"model": '),
        ("other.json", b'{"version": "1.0", "model": {"type": "WordLevel"}}'),
    ],
)
def test_bad_files_name_the_path(tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=name):
        Tokenizer.from_pretrained(path)
