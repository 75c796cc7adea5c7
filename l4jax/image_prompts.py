"""Prompts with images, for generation: images placed in prompt text and chat turns, encoded
once by the vision tower, and handed to `l4jax.generate` as the embeddings of their
`<|patch|>` tokens (`l4jax generate --image`, `l4jax chat`'s `/image`).

Pixels and the token layout of one image are `l4jax.preprocess`; this module is the glue
between them, the tokenizer's dialog format and the multimodal model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from l4jax.errors import ConfigError, ImageError
from l4jax.preprocess import ImageLike, ImageProcessor, ProcessedImage, place_images
from l4jax.tokenizer import Message
from l4jax.vision import Llama4ForConditionalGeneration, text_model_with_images


def attach_images(messages: Sequence[Any], images: Sequence[Any]) -> list[Any]:
    """`messages` with `images` in the first user message: at the `<|image|>` placeholders of
    its text content (`place_images`), else before its content."""
    messages = list(messages)
    first = next((i for i, m in enumerate(messages) if m.role == "user"), None)
    if first is None:
        raise ImageError("the chat has no user message to attach the images to")
    content = messages[first].content
    if isinstance(content, str):
        content = place_images(content, images, "the first user message")
    else:
        content = [*images, *content]
    messages[first] = dataclasses.replace(messages[first], content=content)
    return messages


def _require_multimodal(model: Any) -> None:
    if not isinstance(model, Llama4ForConditionalGeneration):
        raise ConfigError(
            "images need a multimodal checkpoint (config.json with a vision_config, or "
            "params.json with vision_args)"
        )


def image_prompt_encoder(
    model: Any, tokenizer: Any, images: Sequence[ImageLike], pixel_dtype: str = "float32"
) -> tuple[Callable[[Any], list[int]], np.ndarray]:
    """Preprocess `images` once for prompts that hold them: (encode, pixel_values [N, 3, S, S]).

    `encode(text)` is the completion prompt (`ImageProcessor.encode_completion`),
    `encode(messages)` the chat prompt with the images in the first user message
    (`attach_images`). (`l4jax chat` uses `ChatImages`: images in any turn.)
    `pixel_dtype` as in `ImageProcessor`.
    """
    _require_multimodal(model)
    processor = ImageProcessor(
        model.config.vision, tokenizer.special_tokens, pixel_dtype=pixel_dtype
    )
    processed = [processor(image) for image in images]

    def encode(prompt: str | Sequence[Any]) -> list[int]:
        if isinstance(prompt, str):
            return processor.encode_completion(tokenizer, prompt, processed)[0]
        return processor.encode_dialog_prompt(tokenizer, attach_images(prompt, processed))[0]

    return encode, processor.pixel_values(processed)


def image_generation_model(
    model: Any, params: Any, pixel_values: Any
) -> tuple[Any, Any, dict[str, Any]]:
    """(text model, its params, generate kwargs `image_embeds`/`image_token_id`): the images
    are encoded once; `l4jax.generate` merges them into the prefill of a prompt holding them."""
    _require_multimodal(model)
    text_model, text_params, embeds = text_model_with_images(model, params, pixel_values)
    kwargs = {"image_embeds": embeds, "image_token_id": model.config.image_token_index}
    return text_model, text_params, kwargs


class ChatImages:
    """The images of a chat (`l4jax chat`): `add` queues one for the next user turn,
    `user_message(text)` puts the queued ones at the turn's `<|image|>` placeholders (else
    before its text), `encode(messages)` gives the dialog's prompt ids and the generate kwargs
    with every image's embeddings (the vision tower runs again only when the dialog gained
    images). Generate with `text_model` / `text_params`."""

    def __init__(
        self, model: Any, params: Any, tokenizer: Any, pixel_dtype: str = "float32"
    ) -> None:
        _require_multimodal(model)
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.processor = ImageProcessor(
            model.config.vision, tokenizer.special_tokens, pixel_dtype=pixel_dtype
        )
        self.text_model, self.text_params, _ = text_model_with_images(model, params, None)
        self.queued: list[ProcessedImage] = []
        self._encoded: tuple[int, dict[str, Any]] = (0, {})  # (tiles, generate kwargs)

    def add(self, image: ImageLike) -> None:
        """Queue `image` (preprocessed now: ImageError if it is unreadable)."""
        self.queued.append(self.processor(image))

    def user_message(self, text: str) -> Any:
        """The user turn `text` with the queued images (then no longer queued). ImageError if
        the text's placeholders do not match them (they stay queued)."""
        if not self.queued:
            return Message("user", text)
        content = place_images(text, self.queued, "this user turn")
        self.queued = []
        return Message("user", content)

    def encode(self, messages: Sequence[Any]) -> tuple[list[int], dict[str, Any]]:
        """(prompt ids of `messages`, generate kwargs `image_embeds`/`image_token_id`; empty
        without images)."""
        ids, pixels = self.processor.encode_dialog_prompt(self.tokenizer, messages)
        tiles = 0 if pixels is None else len(pixels)
        if tiles != self._encoded[0]:  # (a dialog only gains images)
            self._encoded = (tiles, image_generation_model(self.model, self.params, pixels)[2])
        return ids, self._encoded[1]


def image_generation_inputs(
    model: Any,
    params: Any,
    tokenizer: Any,
    images: Sequence[ImageLike],
    text: str | None = None,
    messages: Sequence[Any] | None = None,
    pixel_dtype: str = "float32",
) -> tuple[Any, Any, list[int], dict[str, Any]]:
    """What `l4jax.generate` needs to generate from a prompt with images: (text model, its
    params, prompt ids, generate kwargs `image_embeds`/`image_token_id`).

    The prompt is Meta's completion `<|begin_of_text|>` + `text` with the images, or the chat
    prompt of `messages` with the images in the first user message; either way at the
    `<|image|>` placeholders of the text if it has any, else before it.
    """
    if (text is None) == (messages is None):
        raise ValueError("give exactly one of text or messages")
    encode, pixels = image_prompt_encoder(model, tokenizer, images, pixel_dtype)
    ids = encode(text if messages is None else messages)
    text_model, text_params, kwargs = image_generation_model(model, params, pixels)
    return text_model, text_params, ids, kwargs
