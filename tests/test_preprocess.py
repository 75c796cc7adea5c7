"""l4jax.preprocess against Meta's `llama_models.llama4` preprocess/chat_format and HF's code.

torchvision is not installed here, and both references import it. Meta's pipeline runs
unmodified on a 40-line stand-in for the four torchvision pieces it calls on PIL images
(`functional.resize`, `Resize`, `ToTensor`, `Normalize`), each a transcription of torchvision's
PIL code path (`F_pil.resize` = `PIL.Image.resize` bilinear, `to_tensor` = uint8 / 255 in fp32,
`normalize` = `sub_(mean).div_(std)`). HF's `Llama4ImageProcessor` resizes with torchvision
tensor kernels, so only its pure functions (canvas choice, resized size) run here, extracted
from its source file; its token layout (`Llama4Processor._prompt_split_image`) runs as is.
"""

from __future__ import annotations

import ast
import enum
import importlib
import importlib.machinery
import io
import math
import sys
import types
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from transformers.image_utils import SizeDict
from transformers.models import llama4
from transformers.models.llama4.processing_llama4 import Llama4Processor

from l4jax.errors import ConfigError
from l4jax.image_prompts import attach_images
from l4jax.preprocess import (
    PIXEL_DTYPES,
    ImageError,
    ImageProcessor,
    best_canvas,
    image_token_ids,
    load_image,
    normalize,
    preprocess_image,
    resized_size,
    supported_canvases,
)
from l4jax.tokenizer import Message, Tokenizer
from l4jax.vision_config import vision_preset

SCOUT = vision_preset("scout")
# (height, width): tiny, exact tile, landscape, portrait, extreme strips, large, odd sizes
SIZES = [(20, 30), (336, 336), (300, 500), (800, 300), (90, 1500), (1500, 60), (1024, 768),
         (337, 1009), (2000, 3000), (673, 672)]  # fmt: skip


# ---- the references -----------------------------------------------------------------------


class _SizeProbe:
    """Stands in for a PIL image where only the resize target is wanted."""

    def __init__(self, height: int, width: int) -> None:
        self.size = (width, height)


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    class InterpolationMode(enum.Enum):
        BILINEAR = "bilinear"

    def resize(img, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
        assert interpolation == InterpolationMode.BILINEAR and len(size) == 2
        if isinstance(img, _SizeProbe):
            return tuple(size)
        if [img.height, img.width] == list(size):  # torchvision returns the input unchanged
            return img
        return img.resize(tuple(size[::-1]), Image.BILINEAR)  # F_pil.resize

    class Resize:
        def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
            self.size, self.interpolation = list(size), interpolation

        def __call__(self, img):
            return resize(img, self.size, self.interpolation)

    class ToTensor:
        def __call__(self, pic):
            img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
            img = img.view(pic.size[1], pic.size[0], len(pic.getbands()))
            return img.permute((2, 0, 1)).contiguous().to(dtype=torch.float32).div(255)

    class Normalize:
        def __init__(self, mean, std, inplace=False):
            self.mean, self.std, self.inplace = mean, std, inplace

        def __call__(self, tensor):
            tensor = tensor if self.inplace else tensor.clone()
            mean = torch.as_tensor(self.mean, dtype=tensor.dtype).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=tensor.dtype).view(-1, 1, 1)
            return tensor.sub_(mean).div_(std)

    class Compose:
        def __init__(self, transforms):
            self.transforms = transforms

        def __call__(self, img):
            for t in self.transforms:
                img = t(img)
            return img

    modules = {}
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
        modules[name] = types.ModuleType(name)
        modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
    tv, functional = modules["torchvision.transforms"], modules["torchvision.transforms.functional"]
    tv.InterpolationMode, functional.resize = InterpolationMode, resize
    tv.Resize, tv.ToTensor, tv.Normalize, tv.Compose = Resize, ToTensor, Normalize, Compose
    tv.functional, modules["torchvision"].transforms = functional, tv
    return modules


@pytest.fixture(scope="module")
def meta() -> Any:
    """Meta's preprocess and chat_format modules, imported afresh on the stand-in (which is
    in sys.modules only while they import)."""
    pytest.importorskip("llama_models.llama4.tokenizer")
    truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    modules = types.SimpleNamespace()
    with pytest.MonkeyPatch.context() as mp:
        for name, module in _torchvision_stand_in().items():
            mp.setitem(sys.modules, name, module)
        for short in ("preprocess", "chat_format"):
            name = f"llama_models.llama4.{short}"
            mp.delitem(sys.modules, name, raising=False)
            setattr(modules, short, importlib.import_module(name))
    # Meta's preprocess switches on PIL's truncated-image loading for the whole process
    ImageFile.LOAD_TRUNCATED_IMAGES = truncated
    return modules


@pytest.fixture(scope="module")
def hf() -> Any:
    """HF's canvas functions, executed from image_processing_llama4.py (which imports
    torchvision at the top, so the module itself cannot be imported here)."""
    source = Path(llama4.__file__).parent / "image_processing_llama4.py"
    wanted = {"get_factors", "get_max_res_without_distortion", "find_supported_resolutions",
              "get_best_fit"}  # fmt: skip
    tree = ast.parse(source.read_text())
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {n.name for n in body} == wanted
    (processor,) = [n for n in tree.body if getattr(n, "name", "") == "Llama4ImageProcessor"]
    body += [n for n in processor.body if getattr(n, "name", "") == "rescale_and_normalize"]
    namespace = {"math": math, "torch": torch, "defaultdict": defaultdict, "lru_cache": lru_cache,
                 "SizeDict": SizeDict}  # fmt: skip
    exec(compile(ast.Module(body=body, type_ignores=[]), str(source), "exec"), namespace)
    namespace["size"] = SizeDict(height=336, width=336)
    return types.SimpleNamespace(**namespace)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def picture(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Noise over gradients: every resampling weight shows in the pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    base = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), (x + y) % 256], -1)
    noise = rng.integers(-40, 40, (height, width, 3))
    rgb = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    return rgb if mode == "RGB" else rgb.convert(mode)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---- canvas choice ------------------------------------------------------------------------


def _meta_canvas(meta: Any, hw: tuple[int, int], to_max: bool) -> tuple[tuple[int, int], Any]:
    transform = meta.preprocess.VariableSizeImageTransform(336)
    resolutions = torch.tensor(transform.find_supported_resolutions(16, 336))
    canvas_w, canvas_h = transform.get_best_fit((hw[1], hw[0]), resolutions, to_max)
    limit = None if to_max else 336
    probe = _SizeProbe(*hw)
    resized = transform.resize_without_distortion(probe, (canvas_w, canvas_h), limit)
    return (canvas_h, canvas_w), resized


def _hf_canvas(hf: Any, hw: tuple[int, int], to_max: bool) -> tuple[tuple[int, int], Any]:
    resolutions = torch.tensor(hf.find_supported_resolutions(16, hf.size))
    target = tuple(hf.get_best_fit(hw, resolutions, resize_to_max_canvas=to_max).tolist())
    bounded = target
    if not to_max:  # Llama4ImageProcessor._preprocess, verbatim
        bounded = (min(max(hw[0], 336), target[0]), min(max(hw[1], 336), target[1]))
    new = hf.get_max_res_without_distortion(hw, bounded)
    return target, (max(new[0], 1), max(new[1], 1))


def test_canvas_and_resize_match_meta_and_hf(meta: Any, hf: Any) -> None:
    canvases = supported_canvases(16, 336)
    assert sorted(canvases) == sorted(meta.preprocess.VariableSizeImageTransform(336)
                                      .find_supported_resolutions(16, 336))  # fmt: skip
    rng = np.random.default_rng(0)
    random_sizes = [tuple(int(v) for v in s) for s in rng.integers(1, 4000, (150, 2))]
    ratios = [(h, h * a // b) for h in (100, 336, 700) for a, b in ((1, 16), (3, 1), (5, 4))]
    for hw in SIZES + random_sizes + ratios + [(1, 1), (336, 5376), (5376, 336)]:
        for to_max in (False, True):
            ours = best_canvas(hw, canvases, to_max)
            size = resized_size(hw, ours, 336, to_max)
            meta_canvas, meta_size = _meta_canvas(meta, hw, to_max)
            hf_canvas, hf_size = _hf_canvas(hf, hw, to_max)
            assert ours == meta_canvas == hf_canvas, (hw, to_max)
            assert size == meta_size == hf_size, (hw, to_max)
            assert size[0] <= ours[0] and size[1] <= ours[1]


# ---- pixels -------------------------------------------------------------------------------


def _meta_tiles(meta: Any, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
    """ChatFormat._encode_content's image path: dynamic tiles, plus the global tile."""
    tiles, aspect = meta.preprocess.VariableSizeImageTransform(336)(image, max_num_chunks=16)
    if tiles.shape[0] > 1:
        whole = meta.preprocess.ResizeNormalizeImageTransform(336, 336)(image)
        tiles = torch.cat((tiles, whole.unsqueeze(0)), dim=0)
    return tiles.numpy(), aspect


@pytest.mark.parametrize("hw", SIZES[:8])
def test_tiles_match_meta_exactly(meta: Any, hw: tuple[int, int]) -> None:
    image = picture(*hw, seed=hw[0])
    ours = preprocess_image(image)
    ref, aspect = _meta_tiles(meta, image)
    assert ours.aspect_ratio == tuple(aspect)
    assert ours.tiles.dtype == np.float32 and ours.tiles.shape == ref.shape
    np.testing.assert_array_equal(ours.tiles, ref)
    rows, cols = aspect
    assert ours.num_tiles == rows * cols + (rows * cols > 1)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "1", "I;16"])
def test_rgb_conversion_matches_meta(meta: Any, mode: str) -> None:
    image = picture(40, 50, seed=3)
    if mode in ("RGBA", "LA"):
        alpha = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50), np.uint8))
        image = image.convert(mode[:-1])
        image.putalpha(alpha)
    else:
        image = image.convert(mode)
    ours = np.asarray(load_image(image.copy()))
    ref = np.asarray(meta.chat_format.convert_image_to_rgb(image.copy()))
    np.testing.assert_array_equal(ours, ref)
    from_file = preprocess_image(png_bytes(image) if mode not in ("CMYK",) else image)
    assert from_file.tiles.shape == (1, 3, 336, 336)


# ---- tokens -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def meta_chat(meta: Any) -> Any:
    from llama_models.llama4.args import VisionArgs
    from llama_models.llama4.tokenizer import Tokenizer as MetaTokenizer

    args = VisionArgs(
        image_size={"height": 336, "width": 336},
        patch_size={"height": 14, "width": 14},
        dim=1408,
        n_layers=34,
        n_heads=16,
        mlp_ratio=4.0,
        output_dim=4096,
        pixel_shuffle_ratio=0.5,
    )
    path = Path(sys.modules["llama_models.llama4.tokenizer"].__file__).parent / "tokenizer.model"
    return meta.chat_format.ChatFormat(MetaTokenizer(path), vision_args=args)


def test_dialog_with_images_matches_meta_chat_format(meta_chat: Any, tok: Tokenizer) -> None:
    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem

    wide, tall, small = picture(300, 900, 1), picture(700, 400, 2), picture(100, 120, 3)
    raw = [png_bytes(im) for im in (wide, tall, small)]
    dialog = [
        ("system", ["You are a careful observer."]),
        ("user", [raw[0], "What is in this picture?", raw[1], " And this one?"]),
        ("assistant", ["A gradient, twice."]),
        ("user", ["Now this:", raw[2]]),
    ]
    meta_messages = [
        RawMessage(
            role=role,
            content=[
                RawMediaItem(data=c) if isinstance(c, bytes) else RawTextItem(text=c)
                for c in content
            ],
        )  # fmt: skip
        for role, content in dialog
    ]
    ref = meta_chat.encode_dialog_prompt(meta_messages)
    processor = ImageProcessor(SCOUT, tok.special_tokens)
    ids, pixels = processor.encode_dialog_prompt(tok, [Message(r, c) for r, c in dialog])
    assert ids == ref.tokens
    np.testing.assert_array_equal(pixels, torch.cat(ref.images).numpy())
    patch = tok.special_tokens["<|patch|>"]
    assert ids.count(patch) == pixels.shape[0] * SCOUT.tokens_per_tile  # 144 per tile
    text_only = [Message("user", "No image here.")]
    assert processor.encode_dialog_prompt(tok, text_only) == (
        tok.encode_dialog_prompt(text_only),
        None,
    )


@pytest.mark.parametrize("aspect", [(1, 1), (1, 2), (2, 1), (2, 2), (1, 16), (3, 5), (4, 4)])
def test_image_tokens_match_hf_processor(tok: Tokenizer, aspect: tuple[int, int]) -> None:
    text = Llama4Processor._prompt_split_image(None, aspect, SCOUT.tokens_per_tile)
    ref = tok.encode(text, bos=False, eos=False, allowed_special="all")
    assert image_token_ids(aspect, SCOUT.tokens_per_tile, tok.special_tokens) == ref


def test_placeholders_expand_as_hf_processor(tok: Tokenizer) -> None:
    """HF replaces the i-th `<|image|>` of the text by image i's tokens, then tokenizes."""
    processor = ImageProcessor(SCOUT, tok.special_tokens)
    images = [processor(picture(400, 900, 4)), processor(picture(200, 200, 5))]
    text = "<|header_start|>user<|header_end|>\n\n<|image|>Compare<|image|> these.<|eot|>"
    pieces = text.split("<|image|>")
    expanded = pieces[0]
    for image, rest in zip(images, pieces[1:]):
        expanded += Llama4Processor._prompt_split_image(
            None, image.aspect_ratio, SCOUT.tokens_per_tile
        )
        expanded += rest
    ref = tok.encode(expanded, bos=True, eos=False, allowed_special="all")
    ids = tok.encode(text, bos=True, eos=False, allowed_special="all")
    assert processor.expand(ids, images) == ref
    assert [im.aspect_ratio for im in images] == [(2, 3), (1, 1)]
    assert processor.pixel_values(images).shape == (2 * 3 + 1 + 1, 3, 336, 336)  # + global
    # a prompt's or the first user message's <|image|> placeholders take the images likewise
    dialog = attach_images([Message("user", "<|image|>Compare<|image|> these.")], images)
    assert processor.encode_dialog_prompt(tok, dialog)[0] == ref + tok.encode_header("assistant")
    completion = "Compare <|image|>and<|image|>."
    ids = tok.encode(completion, bos=True, eos=False, allowed_special="all")
    assert processor.encode_completion(tok, completion, images)[0] == processor.expand(ids, images)


def test_bfloat16_pixels_round_as_hf_processor(hf: Any) -> None:
    """`pixel_dtype="bfloat16"` equals HF's `Llama4ImageProcessor.rescale_and_normalize` (run
    from its source; torchvision's `normalize` is the stand-in's) bit for bit: for every uint8
    value, and on every tile of a preprocessed image (canvas pixels read back from float32)."""
    normalize_stand_in = _torchvision_stand_in()["torchvision.transforms"].Normalize
    stand_in = types.SimpleNamespace(
        normalize=lambda x, mean, std: normalize_stand_in(mean, std)(x)
    )

    def hf_pixels(uint8_nchw: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(uint8_nchw, np.uint8))
        out = hf.rescale_and_normalize(stand_in, x, True, 1 / 255, True, [0.5] * 3, [0.5] * 3)
        assert out.dtype == torch.bfloat16
        return out.float().numpy()

    every = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=-1)
    ours = normalize(every, "bfloat16")
    np.testing.assert_array_equal(ours, hf_pixels(every.transpose(2, 0, 1)))
    assert np.mean(ours == normalize(every)) < 0.6  # float32 (Meta's) differs for most values
    tiles = {d: preprocess_image(picture(400, 900, 4), pixel_dtype=d).tiles for d in PIXEL_DTYPES}
    canvas = np.rint((tiles["float32"].astype(np.float64) * 0.5 + 0.5) * 255)
    assert tiles["bfloat16"].shape == (2 * 3 + 1, 3, 336, 336)
    np.testing.assert_array_equal(tiles["bfloat16"], hf_pixels(canvas))
    with pytest.raises(ImageError, match="pixel_dtype must be one of"):
        preprocess_image(picture(20, 20), pixel_dtype="float16")


# ---- bad input ----------------------------------------------------------------------------


def test_unreadable_images_raise(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(np.random.default_rng(0).bytes(1000))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png_bytes(picture(200, 200))[:3000])
    for path, message in (
        (garbage, "garbage.jpg: not an image file"),
        (truncated, "truncated.png: unreadable image"),
        (tmp_path / "missing.png", "missing.png: no such file"),
        (tmp_path, "is a directory"),
    ):
        with pytest.raises(ImageError, match=message):
            preprocess_image(path)
    with pytest.raises(ImageError, match="bytes: not an image file"):
        preprocess_image(b"not a picture")


def test_wrong_channel_count_raises(tok: Tokenizer) -> None:
    for shape in ((10, 10, 4), (10, 10, 1), (10, 10)):
        with pytest.raises(ImageError, match=r"expected an RGB array \[H, W, 3\]"):
            preprocess_image(np.zeros(shape, np.uint8))
    with pytest.raises(ConfigError, match="vision_config.num_channels: 4, but images are"):
        ImageProcessor(SCOUT.replace(num_channels=4), tok.special_tokens)
    with pytest.raises(ImageError, match="uint8"):
        preprocess_image(np.zeros((10, 10, 3), np.float32))
    array = np.asarray(picture(50, 60))
    np.testing.assert_array_equal(
        preprocess_image(array).tiles, preprocess_image(Image.fromarray(array)).tiles
    )


def test_more_images_than_placeholders_raises(tok: Tokenizer) -> None:
    processor = ImageProcessor(SCOUT, tok.special_tokens)
    images = [processor(picture(30, 30, s)) for s in range(3)]
    ids = tok.encode("<|image|> two? <|image|>", bos=True, eos=False, allowed_special="all")
    with pytest.raises(ImageError, match=r"3 image\(s\) for 2 <\|image\|> placeholder"):
        processor.expand(ids, images)
    with pytest.raises(ImageError, match=r"1 image\(s\) for 2"):
        processor.expand(ids, images[:1])
    with pytest.raises(ImageError, match=r"3 image\(s\) for 1 <\|image\|> .* in the prompt"):
        processor.encode_completion(tok, "<|image|> one?", images)
    with pytest.raises(ImageError, match="no <|patch|> token"):
        ImageProcessor(SCOUT, {"<|image|>": 1})
