"""Llama 4 image preprocessing and image token layout, with PIL and numpy (no torch).

Pixel-for-pixel the pipeline of Meta's `llama_models/llama4/preprocess.py` +
`chat_format.py` (which Hugging Face's `Llama4ImageProcessor` re-implements):

1. decode the image and convert it to RGB (RGBA is composited over white);
2. choose a canvas of (h * S, w * S) pixels, h * w <= max_num_tiles (S = tile size, 336): the
   one needing the least upscaling, else the least downscaling, then the smallest area;
3. resize without distortion (PIL bilinear) to fit the canvas, upscaling at most to S
   unless `resize_to_max_canvas`;
4. pad right/bottom with black, normalise (x / 255 - 0.5) / 0.5 in float32 (or, with
   `pixel_dtype="bfloat16"`, rounded to bfloat16 op by op as Hugging Face's processor does);
5. split into h x w tiles [3, S, S], row-major; if there is more than one, append a global
   tile: the whole image resized (with distortion) to S x S.

Each tile becomes `tokens_per_tile` `<|patch|>` tokens (144 for Llama 4), laid out as
`<|image_start|>` [tile rows: patches `<|tile_x_separator|>` ... patches `<|tile_y_separator|>`]
`<|image|>` global-or-only-tile patches `<|image_end|>` (Meta's `ChatFormat._encode_image`, HF's
`Llama4Processor._prompt_split_image`).

Hugging Face's processor differs from Meta's in two ways: it resizes with torchvision's tensor
kernels (not followed here) and normalises in bfloat16 (`pixel_dtype="bfloat16"`).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ml_dtypes import bfloat16

from l4jax.errors import ConfigError, ImageError
from l4jax.vision_config import PIXEL_DTYPES, Llama4VisionConfig

try:
    from PIL import Image, UnidentifiedImageError
except ImportError:  # (a dependency: only a broken install gets here)
    raise ImageError("images need Pillow, which is not installed: pip install pillow") from None

ImageLike = str | os.PathLike | bytes | Image.Image | np.ndarray

TILE_SIZE = 336
IMAGE_PLACEHOLDER = "<|image|>"  # in prompt text: where an image goes (HF's processor convention)
MAX_NUM_TILES = 16  # Meta's ChatFormat max_num_chunks, HF's max_patches
IMAGE_TOKENS = (
    "<|image_start|>",
    "<|image_end|>",
    "<|image|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
)


@dataclasses.dataclass(frozen=True)
class ProcessedImage:
    """One image as the model takes it."""

    tiles: np.ndarray  # [n, 3, S, S] float32: h*w canvas tiles row-major (+ the global tile)
    aspect_ratio: tuple[int, int]  # (h, w) canvas tiles

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[0]


# ---- decoding -----------------------------------------------------------------------------------


def load_image(image: ImageLike, name: str | None = None) -> Image.Image:
    """An RGB PIL image from a path, encoded bytes, a PIL image or a uint8 array [H, W, 3].

    RGBA is composited over white, other modes converted, as Meta's `convert_image_to_rgb`.
    Raises ImageError naming the file (or `name`) for unreadable data or a bad array shape.
    """
    what = name or (str(image) if isinstance(image, (str, os.PathLike)) else type(image).__name__)
    if isinstance(image, np.ndarray):
        return Image.fromarray(_rgb_array(image, what))
    if isinstance(image, (str, os.PathLike, bytes)):
        image = _decode(image, what)
    if not isinstance(image, Image.Image):
        raise ImageError(f"{what}: expected a path, bytes, a PIL image or an array")
    return _to_rgb(image, what)


def _rgb_array(array: np.ndarray, what: str) -> np.ndarray:
    if array.ndim != 3 or array.shape[-1] != 3:
        channels = f"{array.shape[-1]} channels" if array.ndim == 3 else f"{array.ndim} dims"
        raise ImageError(
            f"{what}: expected an RGB array [H, W, 3], got shape {array.shape} ({channels})"
        )
    if array.dtype != np.uint8:
        raise ImageError(f"{what}: expected uint8 pixels, got {array.dtype}")
    if min(array.shape[:2]) == 0:
        raise ImageError(f"{what}: empty image {array.shape}")
    return array


def _decode(source: str | os.PathLike | bytes, what: str) -> Image.Image:
    try:
        if isinstance(source, bytes):
            image = Image.open(io.BytesIO(source))
        else:
            image = Image.open(Path(source))
        image.load()
    except FileNotFoundError:
        raise ImageError(f"{what}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{what}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise ImageError(f"{what}: not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{what}: unreadable image ({e})") from None
    return image


def _to_rgb(image: Image.Image, what: str) -> Image.Image:
    try:
        if image.mode == "RGBA":
            image.load()
            rgb = Image.new("RGB", image.size, (255, 255, 255))
            rgb.paste(image, mask=image.split()[3])
            return rgb
        return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise ImageError(f"{what}: cannot convert {image.mode} image to RGB ({e})") from None


# ---- canvas choice and resizing -----------------------------------------------------------------


def supported_canvases(max_num_tiles: int, tile_size: int) -> list[tuple[int, int]]:
    """Every (a * S, b * S) with a * b <= max_num_tiles, in Meta's order (by aspect ratio,
    first seen while counting tile totals down)."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for total in range(max_num_tiles, 0, -1):
        for a in sorted(_factors(total)):
            by_ratio[a / (total // a)].append((a, total // a))
    return [(a * tile_size, b * tile_size) for pairs in by_ratio.values() for a, b in pairs]


def _factors(n: int) -> set[int]:
    out = set()
    for i in range(1, int(n**0.5) + 1):
        if n % i == 0:
            out.update((i, n // i))
    return out


def best_canvas(
    image_hw: tuple[int, int], canvases: Sequence[tuple[int, int]], resize_to_max_canvas: bool
) -> tuple[int, int]:
    """The (height, width) canvas for an image of `image_hw`: Meta's `get_best_fit`.

    Scales are float32 as in torch. Meta reads a canvas pair as (width, height) (HF as
    (height, width)); the candidate set is symmetric, and we keep Meta's reading for ties.
    """
    h, w = image_hw
    pairs = np.asarray(canvases, np.int64)
    canvas_w, canvas_h = pairs[:, 0], pairs[:, 1]
    scale_w = canvas_w.astype(np.float32) / np.float32(w)
    scale_h = canvas_h.astype(np.float32) / np.float32(h)
    scales = np.where(scale_w > scale_h, scale_h, scale_w)
    up = scales[scales >= 1]
    if len(up):
        chosen = up.max() if resize_to_max_canvas else up.min()
    else:
        chosen = scales[scales < 1].max()
    candidates = pairs[scales == chosen]
    best = candidates[np.argmin(candidates[:, 0] * candidates[:, 1])]
    return int(best[1]), int(best[0])


def resized_size(
    image_hw: tuple[int, int],
    canvas_hw: tuple[int, int],
    tile_size: int,
    resize_to_max_canvas: bool,
) -> tuple[int, int]:
    """(height, width) after resizing without distortion into the canvas; upscaling stops at
    the tile size unless `resize_to_max_canvas` (Meta's `resize_without_distortion`)."""
    h, w = image_hw
    target_h, target_w = canvas_hw
    if not resize_to_max_canvas:
        target_h = min(max(h, tile_size), target_h)
        target_w = min(max(w, tile_size), target_w)
    scale_w, scale_h = target_w / w, target_h / h
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.floor(h * scale_w), target_h)
    else:
        new_h, new_w = target_h, min(math.floor(w * scale_h), target_w)
    return max(new_h, 1), max(new_w, 1)


def _resize(image: Image.Image, size_hw: tuple[int, int]) -> Image.Image:
    """PIL bilinear, as torchvision's `resize` of a PIL image (a no-op at the same size)."""
    if (image.height, image.width) == size_hw:
        return image
    return image.resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR)


def normalize(pixels_hwc: np.ndarray, pixel_dtype: str = "float32") -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W]: (x / 255 - 0.5) / 0.5.

    "float32": op by op in float32 (Meta's ToTensor + Normalize). "bfloat16": HF's
    `Llama4ImageProcessor.rescale_and_normalize` on a bfloat16 tensor, x * (1 / 255), - 0.5,
    / 0.5, each result rounded to bfloat16 (returned as float32 holding those values).
    """
    x = pixels_hwc.astype(np.float32).transpose(2, 0, 1)
    if pixel_dtype == "float32":
        return (x / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    x = (x * np.float32(1 / 255)).astype(bfloat16).astype(np.float32)
    x = (x - np.float32(0.5)).astype(bfloat16).astype(np.float32)
    return x / np.float32(0.5)  # exact: a bfloat16 value times 2


def preprocess_image(
    image: ImageLike,
    tile_size: int = TILE_SIZE,
    max_num_tiles: int = MAX_NUM_TILES,
    resize_to_max_canvas: bool = False,
    pixel_dtype: str = "float32",
) -> ProcessedImage:
    """Tiles [n, 3, S, S] float32 (canvas tiles row-major, then the global tile if n > 1);
    `pixel_dtype="bfloat16"` rounds the normalisation as HF's processor (`normalize`)."""
    if max_num_tiles < 1:
        raise ImageError(f"max_num_tiles must be positive, got {max_num_tiles}")
    if pixel_dtype not in PIXEL_DTYPES:
        raise ImageError(f"pixel_dtype must be one of {PIXEL_DTYPES}, got {pixel_dtype!r}")
    rgb = load_image(image)
    hw = (rgb.height, rgb.width)
    canvas = best_canvas(hw, supported_canvases(max_num_tiles, tile_size), resize_to_max_canvas)
    resized = _resize(rgb, resized_size(hw, canvas, tile_size, resize_to_max_canvas))
    padded = np.zeros((*canvas, 3), np.uint8)
    padded[: resized.height, : resized.width] = np.asarray(resized)
    rows, cols = canvas[0] // tile_size, canvas[1] // tile_size
    x = normalize(padded, pixel_dtype).reshape(3, rows, tile_size, cols, tile_size)
    tiles = x.transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile_size, tile_size)
    if rows * cols > 1:
        whole = normalize(np.asarray(_resize(rgb, (tile_size, tile_size))), pixel_dtype)
        tiles = np.concatenate([tiles, whole[None]])
    return ProcessedImage(np.ascontiguousarray(tiles), (rows, cols))


# ---- token layout ------------------------------------------------------------------------------


def image_token_ids(
    aspect_ratio: tuple[int, int], tokens_per_tile: int, special_tokens: Mapping[str, int]
) -> list[int]:
    """The tokens standing for one image (Meta's `_encode_image`, HF's `_prompt_split_image`)."""
    ids = {name: special_tokens[name] for name in IMAGE_TOKENS}
    patches = [ids["<|patch|>"]] * tokens_per_tile
    rows, cols = aspect_ratio
    out = [ids["<|image_start|>"]]
    if rows * cols > 1:
        for _ in range(rows):
            for col in range(cols):
                out += patches
                if col < cols - 1:
                    out.append(ids["<|tile_x_separator|>"])
            out.append(ids["<|tile_y_separator|>"])
    return out + [ids["<|image|>"], *patches, ids["<|image_end|>"]]


class ImageProcessor:
    """Images -> pixel tiles and their tokens, for a model's vision config.

    `tokens_for`/`pixel_values` give what `Llama4ForConditionalGeneration` takes; `expand` puts
    each image's tokens where the prompt has an `<|image|>` placeholder (as HF's processor does
    with its text), `encode_dialog_prompt` builds Meta's chat prompt with image content.
    `pixel_dtype="bfloat16"` gives HF's bfloat16-rounded pixel values (`normalize`).
    """

    def __init__(
        self,
        vision: Llama4VisionConfig,
        special_tokens: Mapping[str, int],
        max_num_tiles: int = MAX_NUM_TILES,
        resize_to_max_canvas: bool = False,
        pixel_dtype: str = "float32",
    ) -> None:
        missing = [name for name in IMAGE_TOKENS if name not in special_tokens]
        if missing:
            raise ImageError(f"the tokenizer has no {missing[0]} token")
        if vision.num_channels != 3:
            raise ConfigError(
                f"vision_config.num_channels: {vision.num_channels}, but images are preprocessed "
                "to RGB tiles (3 channels)"
            )
        self.vision = vision
        self.special_tokens = dict(special_tokens)
        self.max_num_tiles = max_num_tiles
        self.resize_to_max_canvas = resize_to_max_canvas
        self.pixel_dtype = pixel_dtype

    def __call__(self, image: ImageLike | ProcessedImage) -> ProcessedImage:
        """Preprocess one image (a `ProcessedImage` passes through unchanged)."""
        if isinstance(image, ProcessedImage):
            return image
        return preprocess_image(
            image,
            self.vision.image_size,
            self.max_num_tiles,
            self.resize_to_max_canvas,
            self.pixel_dtype,
        )

    def tokens_for(self, image: ProcessedImage) -> list[int]:
        return image_token_ids(image.aspect_ratio, self.vision.tokens_per_tile, self.special_tokens)

    @staticmethod
    def pixel_values(images: Sequence[ProcessedImage]) -> np.ndarray | None:
        """All tiles of `images`, in order, [N, 3, S, S] float32 (None without images)."""
        return np.concatenate([im.tiles for im in images]) if images else None

    def expand(self, token_ids: Sequence[int], images: Sequence[ProcessedImage]) -> list[int]:
        """Replace the i-th `<|image|>` id of `token_ids` by image i's tokens."""
        placeholder = self.special_tokens["<|image|>"]
        count = sum(1 for t in token_ids if t == placeholder)
        if count != len(images):
            raise ImageError(
                f"{len(images)} image(s) for {count} <|image|> placeholder(s) in the prompt"
            )
        out: list[int] = []
        remaining = iter(images)
        for t in token_ids:
            out.extend(self.tokens_for(next(remaining)) if t == placeholder else [t])
        return out

    def encode_completion(
        self, tokenizer: Any, text: str, images: Sequence[ImageLike]
    ) -> tuple[list[int], np.ndarray | None]:
        """`<|begin_of_text|>` and Meta's `ChatFormat.encode_content(place_images(text, images))`:
        each image's tokens at an `<|image|>` of the text, or all before a text without one.
        Returns (tokens, pixel_values or None)."""
        ids, processed = [tokenizer.bos_id], []
        for piece in place_images(text, images, "the prompt"):
            if isinstance(piece, str):
                ids += tokenizer.encode(piece, bos=False, eos=False)
            else:
                processed.append(self(piece))
                ids += self.tokens_for(processed[-1])
        return ids, self.pixel_values(processed)

    def encode_dialog_prompt(
        self, tokenizer: Any, messages: Sequence[Any]
    ) -> tuple[list[int], np.ndarray | None]:
        """Meta's `ChatFormat.encode_dialog_prompt` with images: `messages` are
        `l4jax.tokenizer.Message`s whose content may hold images (paths, bytes, PIL images,
        arrays) between text pieces. Returns (tokens, pixel_values [N, 3, S, S] or None)."""
        ids = [tokenizer.bos_id]
        images: list[ProcessedImage] = []
        for message in messages:
            message_ids, message_images = self._encode_message(tokenizer, message)
            ids += message_ids
            images += message_images
        ids += tokenizer.encode_header("assistant")
        return ids, self.pixel_values(images)

    def _encode_message(self, tokenizer: Any, message: Any) -> tuple[list[int], list[Any]]:
        """The tokenizer's text-only message tokens, each image's tokens inserted after the text
        pieces before it (every content piece is tokenized on its own, as Meta does)."""
        content = [message.content] if isinstance(message.content, str) else list(message.content)
        is_text = [isinstance(c, str) for c in content]
        if all(is_text):
            return tokenizer.encode_message(message), []
        text = [c for c in content if isinstance(c, str)]
        ids = tokenizer.encode_message(dataclasses.replace(message, content=text))
        offset = len(tokenizer.encode_header(message.role))
        inserts, images = [], []
        for piece in content:
            if isinstance(piece, str):
                offset += len(tokenizer.encode(piece, bos=False, eos=False))
            else:
                image = self(piece)
                images.append(image)
                inserts.append((offset, self.tokens_for(image)))
        for at, tokens in reversed(inserts):
            ids[at:at] = tokens
        return ids, images


def place_images(text: str, images: Sequence[Any], where: str) -> list[Any]:
    """Content pieces: `images` at the `<|image|>` placeholders of `text`, one each (as HF's
    processor reads a prompt), or all before the text if it has none (Meta's order).
    A count mismatch raises ImageError naming `where` the text is."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) == 1:
        return [*images, text]
    if len(pieces) - 1 != len(images):
        raise ImageError(
            f"{len(images)} image(s) for {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholder(s) "
            f"in {where}"
        )
    content = [pieces[0]]
    for image, piece in zip(images, pieces[1:]):
        content += [image, piece]
    return [piece for piece in content if not isinstance(piece, str) or piece]
