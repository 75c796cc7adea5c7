"""`l4jax generate` and `l4jax chat`: load a checkpoint (or a random preset), tokenize, stream.

The generation itself is `l4jax.decoding.generate`; this module adds what a person at a
terminal needs: the model and tokenizer from a directory, text streamed as tokens arrive, chat
turns in Meta's dialog format, images through `l4jax.image_prompts`, the argparse flags.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from l4jax import context_parallel, quantization
from l4jax.config import PRESETS, preset
from l4jax.convert import from_pretrained
from l4jax.convert.formats import open_checkpoint, source_config
from l4jax.decoding import generate
from l4jax.errors import ConfigError, ImageError
from l4jax.kv_cache import KV_CACHE_DTYPES
from l4jax.model import Llama4ForCausalLM, init_params, param_logical_axes
from l4jax.quantization import MODES, quantize_logged
from l4jax.tokenizer import Message, Tokenizer
from l4jax.vision_config import PIXEL_DTYPES
from sharding import make_mesh
from sharding.rules import mesh_context, shard_params

if TYPE_CHECKING:  # (l4jax.image_prompts, with PIL, loads when images are used)
    from jax.sharding import Mesh

    from l4jax.image_prompts import ChatImages

log = logging.getLogger(__name__)
# prompts are left-padded to a multiple of this, so turns of similar length share a compilation
PAD_MULTIPLE = 64


def load_for_generation(
    checkpoint: str | None = None,
    preset_name: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    vision: bool = False,
) -> tuple[Llama4ForCausalLM, Any, Tokenizer]:
    """(model, params, tokenizer) from a checkpoint directory or a random preset model.

    The tokenizer is the checkpoint's (tokenizer.model / tokenizer.json) if it has one, else
    `Tokenizer.default()`. A random preset model is built with the tokenizer's vocabulary size
    (its own is a small placeholder); a checkpoint whose vocabulary is smaller than the
    tokenizer's is refused. `vision`: a multimodal checkpoint gives the multimodal model.
    """
    if (checkpoint is None) == (preset_name is None):
        raise ConfigError("give exactly one of a checkpoint directory or a preset name")
    if checkpoint is not None:
        path = Path(checkpoint)
        has_tokenizer = any((path / f).is_file() for f in ("tokenizer.model", "tokenizer.json"))
        tokenizer = Tokenizer.from_pretrained(path) if has_tokenizer else Tokenizer.default()
        source = f"{checkpoint}/config.json: vocab_size"
        text_vocab = source_config(open_checkpoint(path)).vocab_size  # check before loading
        if text_vocab < tokenizer.n_words:
            raise ConfigError(
                f"{source} {text_vocab} is smaller than the tokenizer's {tokenizer.n_words} "
                f"ids ({tokenizer.source}); put the checkpoint's own tokenizer next to it"
            )
        model, params = from_pretrained(checkpoint, dtype=dtype, text_only=not vision)
    else:
        tokenizer = Tokenizer.default()
        name = dtype or "float32"
        config = preset(preset_name, vocab_size=tokenizer.n_words, dtype=name, param_dtype=name)
        log.info(
            "random %r model (%.1fM params, vocab_size set to the tokenizer's %d)",
            preset_name,
            config.num_params() / 1e6,
            tokenizer.n_words,
        )
        model, params = Llama4ForCausalLM(config), init_params(config, seed)
        source = f"preset {preset_name!r}: vocab_size"
    vocab_size = getattr(model.config, "text", model.config).vocab_size
    if vocab_size < tokenizer.n_words:
        raise ConfigError(
            f"{source} {vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.n_words} ids ({tokenizer.source}); use the checkpoint's own tokenizer"
        )
    return model, params, tokenizer


def stream_generate(
    model: Llama4ForCausalLM,
    params: Any,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    write: Callable[[str], Any],
    mesh: Mesh | None = None,
    **generate_kwargs: Any,
) -> tuple[list[int], int | None]:
    """Generate for one prompt, writing text pieces as tokens arrive (`Tokenizer.decode_stream`).
    `mesh`: generate under it and its logical rules (`spread_over_mesh`).

    Returns (new ids before the stop token, the stop id or None if max_new_tokens ran out).
    """
    stops = set(generate_kwargs.setdefault("stop_ids", tokenizer.stop_tokens))
    arrived: queue.Queue[int | None] = queue.Queue()
    failure: list[BaseException] = []

    def run() -> None:  # (the mesh context is per thread: entered here)
        try:
            with mesh_context(mesh) if mesh is not None else contextlib.nullcontext():
                generate(
                    model,
                    params,
                    [prompt_ids],
                    on_token=lambda t: arrived.put(int(t[0])),
                    **generate_kwargs,
                )
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)
        finally:
            arrived.put(None)

    new_ids: list[int] = []
    stop: list[int] = []

    def text_ids() -> Iterator[int]:
        for token in iter(arrived.get, None):
            if token in stops:
                stop.append(token)
                return
            new_ids.append(token)
            yield token

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    for piece in tokenizer.decode_stream(text_ids()):
        write(piece)
    worker.join()
    if failure:
        raise failure[0]
    return new_ids, (stop[0] if stop else None)


def read_chat_json(path: str | Path) -> list[Message]:
    """A JSON list of {"role", "content"[, "context"]} messages (text only)."""
    try:
        items = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path}: expected a non-empty JSON list of messages")
    messages = []
    for i, item in enumerate(items):
        roles = ("system", "user", "assistant", "ipython", "tool")
        if not isinstance(item, dict) or item.get("role") not in roles:
            raise ConfigError(f"{path}: message {i} needs a role in {roles}, got {item!r}")
        content = item.get("content")
        if not isinstance(content, str):
            raise ConfigError(f"{path}: message {i} content must be text, got {content!r}")
        messages.append(Message(item["role"], content, context=item.get("context")))
    return messages


def chat_loop(
    model: Llama4ForCausalLM,
    params: Any,
    tokenizer: Tokenizer,
    lines: Iterator[str],
    write: Callable[[str], Any],
    system: str | None = None,
    images: ChatImages | None = None,
    **generate_kwargs: Any,
) -> tuple[list[Message], int]:
    """Interactive chat: each line from `lines` is a user turn; replies stream to `write`
    (`generate_kwargs`: `stream_generate`'s, `mesh` included).

    Every turn re-encodes the whole dialog (Meta's chat format). "/image PATH" queues an image
    for the next user turn (`images`: an `l4jax.image_prompts.ChatImages`, whose text model
    `model` is; None for a text-only model). A turn with bad image input is skipped with a
    one-line error on stderr (its images stay queued). Ends at EOF or "/exit"; returns (the
    dialog, the number of turns skipped).
    """
    messages = [Message("system", system)] if system else []
    skipped = 0
    for line in lines:
        text = line.rstrip("\n")
        command, _, arg = text.strip().partition(" ")
        if command in ("/exit", "/quit"):
            break
        if not text.strip():
            continue
        try:
            if command == "/image":
                if images is None:
                    raise ImageError("images need a multimodal checkpoint")
                images.add(arg.strip())
                write(f"(image {arg.strip()}: in your next message)\n")
                continue
            if images is None:
                user, extra = Message("user", text), {}
                prompt = tokenizer.encode_dialog_prompt([*messages, user])
            else:
                user = images.user_message(text)
                prompt, extra = images.encode([*messages, user])
        except ImageError as e:
            print(f"l4jax chat: error: {e}", file=sys.stderr)
            skipped += 1
            continue
        messages.append(user)
        write("assistant> ")
        reply_ids, stop = stream_generate(
            model, params, tokenizer, prompt, write, **generate_kwargs, **extra
        )
        write("\n")
        reason = "end_of_message" if stop == tokenizer.eom_id else "end_of_turn"
        if stop is None:
            reason = "out_of_tokens"
        messages.append(Message("assistant", tokenizer.decode(reply_ids), stop_reason=reason))
    return messages, skipped


def add_generation_arguments(p: argparse.ArgumentParser, chat: bool) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory (Hugging Face, Meta or l4jax)")
    src.add_argument("--preset", choices=sorted(PRESETS), help="a random model of this preset")
    if chat:
        p.add_argument("--system", help="system prompt")
    else:
        prompt = p.add_mutually_exclusive_group(required=True)
        prompt.add_argument("--prompt", help="text to continue (<|begin_of_text|> + text)")
        prompt.add_argument(
            "--prompt-file",
            metavar="PATH",
            help="UTF-8 text file to continue, for long prompts (as --prompt)",
        )
        prompt.add_argument(
            "--chat-json", help='file with a JSON list of {"role", "content"} messages'
        )
    p.add_argument(
        "--mesh",
        default="",
        help="spread the model and the prompt over devices, e.g. sequence=8 (the prompt's "
        "length split over 8 devices: context parallelism, docs/long_context.md) or "
        "fsdp=2,sequence=4",
    )
    where = "the first user turn" if chat else "the prompt text / first user message"
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help=f"an image in {where}, at its <|image|> placeholders if it has any, else before "
        "its text (repeatable; needs a multimodal checkpoint)",
    )
    p.add_argument(
        "--pixel-dtype",
        choices=PIXEL_DTYPES,
        default="float32",
        help="image normalisation precision: bfloat16 rounds as Hugging Face's processor does "
        "when asked for bfloat16 pixels (default: float32, Meta's)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0, help="sampling (and random preset) seed")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), help="default: the checkpoint's, float32"
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        help="how the KV cache is stored (default: the compute dtype); int8: each entry "
        "quantized with one fp32 scale per kv head, about half of bfloat16's memory",
    )
    p.add_argument(
        "--quantize",
        choices=MODES,
        help="quantize the text model's weights after loading (l4jax.quantize: int4 = Meta's "
        "int4_mixed, fp8 = its fp8_mixed, int8 per channel; docs/quantization.md)",
    )


def _generation_kwargs(
    args: argparse.Namespace, pad_to_multiple_of: int = PAD_MULTIPLE
) -> dict[str, Any]:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        pad_to_multiple_of=pad_to_multiple_of,
        kv_cache_dtype=args.kv_cache_dtype,
    )


def spread_over_mesh(model: Llama4ForCausalLM, params: Any, mesh: Mesh | None) -> tuple[Any, int]:
    """`--mesh`: (the params placed on `mesh` by their logical axes, the prompt length
    multiple; without a mesh the params as they are and PAD_MULTIPLE). With a `sequence`
    axis the prompt's length is split over it (context parallelism, `l4jax.context_parallel`):
    prompts are left-padded to a length it can split (`ContextParallel.length_multiple`: whole
    chunks per shard, two pieces per shard in zig-zag order)."""
    if mesh is None:
        return params, PAD_MULTIPLE
    axes = quantization.logical_axes(param_logical_axes(model.config), params)
    params = shard_params(params, axes, mesh)
    config = model.config
    with mesh_context(mesh):
        cp = context_parallel.for_mesh(layout=config.context_parallel_layout)
    split = 1 if cp is None else cp.length_multiple(config.attention_chunk_size)
    multiple = math.lcm(PAD_MULTIPLE, split)
    log.info("mesh %s: prompts padded to a multiple of %d tokens", dict(mesh.shape), multiple)
    return params, multiple


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _check_images(paths: Sequence[str]) -> None:
    """Unreadable image files fail before a checkpoint is loaded (ImageError naming the file)."""
    from l4jax.preprocess import load_image

    for path in paths:
        load_image(path)


def read_prompt_file(path: str) -> str:
    """The text of a UTF-8 prompt file (ConfigError naming the file if unreadable)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the prompt file ({e})") from None


def _mesh_for(args: argparse.Namespace) -> Mesh | None:
    """`--mesh`, built before any checkpoint loads, so a spec the devices cannot form fails
    first."""
    return make_mesh(args.mesh) if args.mesh else None


def run_generate_cli(args: argparse.Namespace) -> int:
    """`l4jax generate`: one completion, streamed to stdout."""
    mesh = _mesh_for(args)
    if args.prompt_file is not None:
        args.prompt = read_prompt_file(args.prompt_file)
    messages = None if args.prompt is not None else read_chat_json(args.chat_json)
    _check_images(args.image)
    model, params, tokenizer = load_for_generation(
        args.checkpoint, args.preset, args.dtype, args.seed, vision=bool(args.image)
    )
    images: dict[str, Any] = {}
    if args.image:
        from l4jax.image_prompts import image_generation_inputs

        model, params, prompt, images = image_generation_inputs(
            model, params, tokenizer, args.image, args.prompt, messages, args.pixel_dtype
        )
    elif messages is None:
        prompt = tokenizer.encode(args.prompt, bos=True, eos=False)
    else:
        prompt = tokenizer.encode_dialog_prompt(messages)
    log.info("prompt: %d tokens, %d image(s)", len(prompt), len(args.image))
    params = quantize_logged(params, model.config, args.quantize)
    params, multiple = spread_over_mesh(model, params, mesh)
    kwargs = _generation_kwargs(args, multiple)
    stream_generate(model, params, tokenizer, prompt, _write, mesh, **kwargs, **images)
    _write("\n")
    return 0


def run_chat_cli(args: argparse.Namespace) -> int:
    """`l4jax chat`: read user turns from stdin until EOF, /exit or /quit. Exit status 2 if a turn
    was skipped for bad image input."""
    mesh = _mesh_for(args)
    _check_images(args.image)
    model, params, tokenizer = load_for_generation(
        args.checkpoint, args.preset, args.dtype, args.seed, vision=True
    )
    images = None
    if args.image or hasattr(model.config, "vision"):  # ("/image" needs the vision tower)
        from l4jax.image_prompts import ChatImages

        images = ChatImages(model, params, tokenizer, args.pixel_dtype)
        for path in args.image:  # (in the first user turn)
            images.add(path)
        model, params = images.text_model, images.text_params
    params = quantize_logged(params, model.config, args.quantize)
    interactive = sys.stdin.isatty()

    def lines() -> Iterator[str]:
        while True:
            if interactive:
                _write("user> ")
            line = sys.stdin.readline()
            if not line:
                return
            yield line

    params, multiple = spread_over_mesh(model, params, mesh)  # (a vision tower stays on one)
    kwargs = _generation_kwargs(args, multiple)
    _, skipped = chat_loop(
        model, params, tokenizer, lines(), _write, args.system, images, mesh=mesh, **kwargs
    )
    return 2 if skipped else 0
