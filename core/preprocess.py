"""Input preprocessing shared by training and the Triton Python models.

Only numpy and Pillow: `export/` copies this file next to the Triton models, so the pixels and the
text a served model sees are produced by the very code the towers were trained on.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# A 60x80 catalog photo is 4,800 pixels; a 4k photo is 8.3 M. Anything past this is refused
# before decoding, which is what stops a decompression bomb.
DEFAULT_MAX_PIXELS = 40_000_000

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


class ImageError(ValueError):
    """An image that cannot be used: not an image, truncated, or too large."""


def product_text(title: str | None, description: str | None) -> str:
    """The one way a product's text is put together for the text tower."""
    parts = [p.strip() for p in (title, description) if p and p.strip()]
    return ". ".join(parts)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes (JPEG/PNG/WebP/...) into an RGB image, or raise ImageError."""
    if not data:
        raise ImageError("empty image")
    try:
        image = Image.open(io.BytesIO(data))  # lazy: reads the header only
    except Image.UnidentifiedImageError:  # its message names a BytesIO object, not the problem
        raise ImageError("not a decodable image: not JPEG, PNG, WebP or another format Pillow reads") from None
    except Exception as exc:
        raise ImageError(f"not a decodable image ({type(exc).__name__}: {exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels:,}")
    try:
        image.load()
    except Exception as exc:
        raise ImageError(f"broken image data ({type(exc).__name__}: {exc})") from None
    if image.mode != "RGB":
        if image.mode in ("RGBA", "LA", "P") or "transparency" in image.info:
            # Transparent pixels become the white catalog background, not black.
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(canvas, rgba)
        image = image.convert("RGB")
    return image


def resize_image(image: Image.Image, cfg: dict) -> np.ndarray:
    """Resize to the tower's square input per `cfg` (a preprocess_cfg); uint8 (H, W, 3)."""
    size = int(cfg["image_size"])
    resample = _RESAMPLE[cfg.get("interpolation", "bicubic")]
    mode = cfg.get("resize_mode", "pad")
    width, height = image.size
    if mode == "squash":
        out = image.resize((size, size), resample)
    elif mode == "crop":
        scale = size / min(width, height)
        new = (max(size, round(width * scale)), max(size, round(height * scale)))
        resized = image.resize(new, resample)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        out = resized.crop((left, top, left + size, top + size))
    elif mode == "pad":
        scale = size / max(width, height)
        new = (max(1, round(width * scale)), max(1, round(height * scale)))
        resized = image.resize(new, resample)
        out = Image.new("RGB", (size, size), tuple(cfg.get("fill", (255, 255, 255))))
        out.paste(resized, ((size - new[0]) // 2, (size - new[1]) // 2))
    else:
        raise ValueError(f"unknown resize_mode {mode!r}: expected pad, crop or squash")
    return np.asarray(out, dtype=np.uint8)


def normalize_pixels(pixels: np.ndarray, cfg: dict) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W), scaled to [0, 1] then standardized."""
    mean = np.asarray(cfg["mean"], dtype=np.float32)
    std = np.asarray(cfg["std"], dtype=np.float32)
    x = (pixels.astype(np.float32) / 255.0 - mean) / std
    return np.moveaxis(x, -1, -3).copy()


def image_to_pixels(data: bytes, cfg: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> normalized float32 (3, H, W), exactly as the image tower was trained."""
    return normalize_pixels(resize_image(decode_image(data, max_pixels), cfg), cfg)


def load_tokenizer(tokenizer_json: str, max_length: int, pad_to_longest: bool = False):
    """A `tokenizers` fast tokenizer that truncates every text to `max_length` tokens and pads it.

    Fixed-length padding (the default) gives batches that Triton's dynamic batcher can merge and that
    TensorRT profiles like. `pad_to_longest` pads a batch only to its longest text, for an ONNX Runtime
    graph that tokenizes and runs in one process: product texts average 24 of 32 tokens and queries
    5 of 16, so fixed padding is mostly wasted compute there. With the attention mask, the padding
    does not change the embedding.
    """
    from tokenizers import Tokenizer  # the Rust tokenizer only: no transformers, no torch

    tokenizer = Tokenizer.from_file(tokenizer_json)
    tokenizer.enable_truncation(max_length=max_length)
    pad_id = tokenizer.token_to_id("[PAD]") or 0
    tokenizer.enable_padding(length=None if pad_to_longest else max_length, pad_id=pad_id)
    return tokenizer


def tokenize(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (input_ids, attention_mask), int64 (B, padded length)."""
    encodings = tokenizer.encode_batch(texts)
    ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
    return ids, mask
