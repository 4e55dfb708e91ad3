"""Products as tower inputs: decoded images (cached), texts, attributes, and a held-out split."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from core.catalog import CatalogReport, ImageFetcher, has_image_ref
from core.preprocess import ImageError, decode_image, product_text, resize_image
from core.queries import look, product_attributes

logger = logging.getLogger(__name__)


@dataclass
class ProductSet:
    ids: list[str]
    texts: list[str]  # preprocess.product_text(title, description)
    attrs: list[dict[str, str]]  # queries.product_attributes
    pixels: np.ndarray | None  # uint8 (N, S, S, 3), resized per the image preprocess_cfg
    has_image: np.ndarray  # bool (N,)

    def __len__(self) -> int:
        return len(self.ids)


def _image_cache_key(df: pd.DataFrame, image_cfg: dict) -> str:
    path = df.attrs.get("path", "")
    stamp = os.stat(path).st_mtime_ns if path and os.path.exists(path) else 0
    key = json.dumps([path, stamp, len(df), df["product_id"].iloc[:1].tolist(), image_cfg], sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def load_pixels(df: pd.DataFrame, image_cfg: dict, report: CatalogReport,
                cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize every product image once; uint8 (N, S, S, 3) and a has-image mask.

    Broken or missing images are recorded in `report` and their product is kept, text-only.
    The result is cached in `cache_dir`, keyed by the catalog file and the preprocessing.
    """
    cache = Path(cache_dir) / f"pixels-{_image_cache_key(df, image_cfg)}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        data = np.load(cache, allow_pickle=False)
        report.broken_images.extend(json.loads(str(data["broken"])))
        logger.info("images: loaded %d from cache %s", len(data["pixels"]), cache)
        return data["pixels"], data["has_image"]
    size = int(image_cfg["image_size"])
    pixels = np.full((len(df), size, size, 3), 255, dtype=np.uint8)
    has_image = np.zeros(len(df), dtype=bool)
    fetch = ImageFetcher(base_dir=df.attrs.get("base_dir", "."))
    broken = []
    for i, (pid, ref) in enumerate(tqdm(zip(df["product_id"], df["image"]), total=len(df),
                                        desc="images", unit="img", mininterval=2, disable=None)):
        if not has_image_ref(ref):  # already counted as missing by read_catalog
            continue
        try:
            pixels[i] = resize_image(decode_image(fetch(ref)), image_cfg)
            has_image[i] = True
        except (ImageError, OSError, ValueError) as exc:
            broken.append((pid, str(exc)))
    report.broken_images.extend(broken)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")  # runs in parallel may fill the same cache
        np.savez(tmp, pixels=pixels, has_image=has_image, broken=json.dumps(broken))
        os.replace(tmp, cache)
    return pixels, has_image


def build_product_set(df: pd.DataFrame, image_cfg: dict | None, report: CatalogReport,
                      cache_dir: str | os.PathLike | None = None) -> ProductSet:
    rows = df.to_dict("records")
    if image_cfg is not None:
        pixels, has_image = load_pixels(df, image_cfg, report, cache_dir)
    else:
        pixels, has_image = None, np.zeros(len(df), dtype=bool)
    return ProductSet(
        ids=[r["product_id"] for r in rows],
        texts=[product_text(r["title"], r["description"]) for r in rows],
        attrs=[product_attributes(r) for r in rows],
        pixels=pixels,
        has_image=has_image,
    )


def catalog_fingerprint(df: pd.DataFrame) -> str:
    """sha256 of a catalog as read (after --limit and the column mapping), in row order: every product's id,
    texts, attributes, price and image (its bytes, or its path or URL: a file behind a path is not read)."""
    digest = hashlib.sha256()
    for column in df.columns:
        if column == "_row":  # where rows sat in the file: only messages use it
            continue
        digest.update(f"\0{column}\0".encode())
        for value in df[column]:
            data = bytes(value) if isinstance(value, (bytes, bytearray)) else repr(value).encode()
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()


def split_indices(ids: list[str], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stable train/validation split by hashing product ids (independent of row order)."""
    bucket = np.array([int(hashlib.sha1(f"{seed}:{pid}".encode()).hexdigest()[:8], 16) % 10_000
                       for pid in ids])
    val = bucket < int(round(val_fraction * 10_000))
    return np.flatnonzero(~val), np.flatnonzero(val)


def group_indices(products: ProductSet, indices: np.ndarray, key) -> dict:
    """`indices` grouped by `key(attrs)` of each product, in order: key -> list of indices."""
    groups: dict = {}
    for i in indices:
        groups.setdefault(key(products.attrs[i]), []).append(int(i))
    return groups


def photo_queries(products: ProductSet, indices: np.ndarray) -> tuple[np.ndarray, list[list[str]]]:
    """The products among `indices` that have a photo (the photo queries), and for each the ids of the
    products among `indices` of the same look (core.queries.look), its own included."""
    by_look: dict[tuple[str, str], list[str]] = {}
    for i in indices:
        by_look.setdefault(look(products.attrs[i]), []).append(products.ids[i])
    photos = indices[products.has_image[indices]]
    return photos, [by_look[look(products.attrs[i])] for i in photos]
