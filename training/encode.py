"""Batch embedding with the PyTorch towers: validation, evaluation and export parity use these."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from core.preprocess import normalize_pixels

from .data import ProductSet
from .model import ProductSearchModel


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def pixel_tensor(pixels: np.ndarray, image_cfg: dict) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> normalized float (B, 3, S, S), by the code Triton also runs."""
    return torch.from_numpy(normalize_pixels(pixels, image_cfg))


@torch.no_grad()
def embed_queries(model: ProductSearchModel, tokenizer, texts: Sequence[str],
                  batch_size: int = 256) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenize(tokenizer, texts[start:start + batch_size], model.cfg.text_cfg.query_max_length)
        out.append(model.encode_query(**batch).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.embed_dim), np.float32)


@torch.no_grad()
def embed_products(model: ProductSearchModel, tokenizer, products: ProductSet, image_cfg: dict | None,
                   indices: Sequence[int] | None = None, batch_size: int = 128) -> np.ndarray:
    """Product embeddings (text and image fused; a product without a photo embeds text-only)."""
    model.eval()
    indices = np.arange(len(products)) if indices is None else np.asarray(indices)
    out = []
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        batch = tokenize(tokenizer, [products.texts[i] for i in idx], model.cfg.text_cfg.max_length)
        if not model.cfg.multimodal:
            out.append(model.encode_product(**batch).numpy())
            continue
        n = len(idx)
        text_mask = torch.ones(n)
        image_mask = torch.from_numpy(products.has_image[idx].astype(np.float32))
        pixels = pixel_tensor(products.pixels[idx], image_cfg)
        out.append(model.encode_product(**batch, pixel_values=pixels, text_mask=text_mask,
                                        image_mask=image_mask).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.embed_dim), np.float32)


@torch.no_grad()
def embed_image_parts(model: ProductSearchModel, pixels: np.ndarray, image_cfg: dict,
                      batch_size: int = 256) -> torch.Tensor:
    """Product photos, uint8 (N, S, S, 3), through the image tower: image parts (N, P)."""
    model.eval()
    return torch.cat([model.encode_image(pixel_tensor(pixels[s:s + batch_size], image_cfg))
                      for s in range(0, len(pixels), batch_size)])


@torch.no_grad()
def embed_image_queries(model: ProductSearchModel, pixels: np.ndarray, image_cfg: dict,
                        batch_size: int = 256) -> np.ndarray:
    """Product photos, uint8 (N, S, S, 3), as image queries (the image-to-product path)."""
    if not len(pixels):
        return np.zeros((0, model.cfg.embed_dim), np.float32)
    return model.encode_image_query(embed_image_parts(model, pixels, image_cfg, batch_size)).numpy()
