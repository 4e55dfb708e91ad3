"""Batch embedding with the PyTorch towers: validation, evaluation and export parity use these.

Inputs go to the device the model's weights are on; embeddings come back as CPU numpy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from core.preprocess import normalize_pixels

from .data import ProductSet
from .model import ProductSearchModel


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" is the GPU when torch sees one, else the CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but torch {torch.__version__} sees no CUDA GPU")
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def tokenize(tokenizer, texts: Sequence[str], max_length: int,
             device: torch.device | None = None) -> dict[str, torch.Tensor]:
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


def pixel_tensor(pixels: np.ndarray, image_cfg: dict, device: torch.device | None = None) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> normalized float (B, 3, S, S), by the code Triton also runs."""
    return torch.from_numpy(normalize_pixels(pixels, image_cfg)).to(device)


@torch.no_grad()
def embed_queries(model: ProductSearchModel, tokenizer, texts: Sequence[str],
                  batch_size: int = 256) -> np.ndarray:
    model.eval()
    device, out = model_device(model), []
    for start in range(0, len(texts), batch_size):
        batch = tokenize(tokenizer, texts[start:start + batch_size], model.cfg.text_cfg.query_max_length, device)
        out.append(model.encode_query(**batch).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.embed_dim), np.float32)


@torch.no_grad()
def embed_products(model: ProductSearchModel, tokenizer, products: ProductSet, image_cfg: dict | None,
                   indices: Sequence[int] | None = None, batch_size: int = 128) -> np.ndarray:
    """Product embeddings (text and image fused; a product without a photo embeds text-only)."""
    model.eval()
    indices = np.arange(len(products)) if indices is None else np.asarray(indices)
    device, out = model_device(model), []
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        batch = tokenize(tokenizer, [products.texts[i] for i in idx], model.cfg.text_cfg.max_length, device)
        if not model.cfg.multimodal:
            out.append(model.encode_product(**batch).cpu().numpy())
            continue
        text_mask = torch.ones(len(idx), device=device)
        image_mask = torch.from_numpy(products.has_image[idx].astype(np.float32)).to(device)
        pixels = pixel_tensor(products.pixels[idx], image_cfg, device)
        out.append(model.encode_product(**batch, pixel_values=pixels, text_mask=text_mask,
                                        image_mask=image_mask).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.embed_dim), np.float32)


@torch.no_grad()
def embed_image_parts(model: ProductSearchModel, pixels: np.ndarray, image_cfg: dict,
                      batch_size: int = 256) -> torch.Tensor:
    """Product photos, uint8 (N, S, S, 3), through the image tower: image parts (N, P), on the model's device."""
    model.eval()
    device = model_device(model)
    return torch.cat([model.encode_image(pixel_tensor(pixels[s:s + batch_size], image_cfg, device))
                      for s in range(0, len(pixels), batch_size)])


@torch.no_grad()
def embed_image_queries(model: ProductSearchModel, pixels: np.ndarray, image_cfg: dict,
                        batch_size: int = 256) -> np.ndarray:
    """Product photos, uint8 (N, S, S, 3), as image queries (the image-to-product path)."""
    if not len(pixels):
        return np.zeros((0, model.cfg.embed_dim), np.float32)
    return model.encode_image_query(embed_image_parts(model, pixels, image_cfg, batch_size)).cpu().numpy()
