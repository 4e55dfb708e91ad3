"""ONNX Runtime vs PyTorch on real catalog rows: per graph, and end to end per variant."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.catalog import ImageFetcher, has_image_ref, read_catalog
from core.metrics import top_k_overlap
from core.preprocess import ImageError, image_to_pixels, load_tokenizer, product_text, tokenize
from core.queries import generate_queries
from core.specs import FUSION, IMAGE_QUERY_HEAD, IMAGE_TOWER, QUERY_TOWER, TEXT_TOWER
from training.encode import tokenize as torch_tokenize
from training.factory import TOKENIZER_DIR
from training.model import ProductSearchModel

from .graphs import WRAPPERS, GraphSpec
from .pipeline import OnnxPipeline, session

logger = logging.getLogger(__name__)

FP32_TOLERANCE = {"max_abs": 1e-4, "min_cosine": 0.9999}


class ParityError(RuntimeError):
    pass


@dataclass
class Rows:
    titles: list[str]
    descriptions: list[str]
    images: list[bytes | None]
    queries: list[str]

    @classmethod
    def from_catalog(cls, catalog: str | Path, n: int, columns=None) -> Rows:
        df, _ = read_catalog(catalog, columns, limit=n)
        fetch = ImageFetcher(base_dir=df.attrs["base_dir"])
        images = []
        for ref in df["image"]:
            try:
                data = fetch(ref) if has_image_ref(ref) else None
                if data is not None:
                    image_to_pixels(data, {"image_size": 8, "mean": [0] * 3, "std": [1] * 3})
                images.append(data)
            except (ImageError, OSError, ValueError):
                images.append(None)
        queries = [q.text for q in generate_queries(df.to_dict("records"), seed=12345)]
        return cls(df["title"].tolist(), df["description"].tolist(), images, queries)


def _compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    ref = reference / np.linalg.norm(reference, axis=-1, keepdims=True).clip(1e-12)
    cand = candidate / np.linalg.norm(candidate, axis=-1, keepdims=True).clip(1e-12)
    cos = (ref * cand).sum(-1)
    return {"max_abs": float(np.abs(reference - candidate).max()), "min_cosine": float(cos.min()),
            "mean_cosine": float(cos.mean())}


@torch.no_grad()
def torch_reference(model: ProductSearchModel, tokenizer, rows: Rows, image_cfg: dict | None) -> dict:
    """PyTorch embeddings of the rows: the ground truth every ONNX variant is held to."""
    model.eval()
    cfg = model.cfg
    queries = model.encode_query(**torch_tokenize(tokenizer, rows.queries, cfg.text_cfg.query_max_length))
    texts = [product_text(t, d) for t, d in zip(rows.titles, rows.descriptions)]
    batch = torch_tokenize(tokenizer, texts, cfg.text_cfg.max_length)
    out = {"queries": queries.numpy()}
    if not cfg.multimodal:
        out["products"] = model.encode_product(**batch).numpy()
        return out
    size = image_cfg["image_size"]
    pixels = np.stack([image_to_pixels(b, image_cfg) if b else np.zeros((3, size, size), np.float32)
                       for b in rows.images])
    image_mask = torch.tensor([1.0 if b else 0.0 for b in rows.images])
    text_mask = torch.tensor([1.0 if t else 0.0 for t in texts])
    out["products"] = model.encode_product(**batch, pixel_values=torch.from_numpy(pixels),
                                           text_mask=text_mask, image_mask=image_mask).numpy()
    with_image = [b for b in rows.images if b]
    image_pixels = torch.from_numpy(np.stack([image_to_pixels(b, image_cfg) for b in with_image]))
    out["images"] = model.encode_image_query(model.encode_image(image_pixels)).numpy()
    return out


@torch.no_grad()
def graph_parity(model: ProductSearchModel, specs: dict[str, GraphSpec], graphs_dir: Path,
                 checkpoint: Path, rows: Rows, image_cfg: dict | None) -> dict[str, dict]:
    """Each FP32 graph against its PyTorch module on the same real inputs; raises past tolerance."""
    model.eval()
    tokenizer_json = str(checkpoint / TOKENIZER_DIR / "tokenizer.json")
    texts = [product_text(t, d) for t, d in zip(rows.titles, rows.descriptions)]
    q_ids, q_mask = tokenize(load_tokenizer(tokenizer_json, model.cfg.text_cfg.query_max_length), rows.queries)
    p_ids, p_mask = tokenize(load_tokenizer(tokenizer_json, model.cfg.text_cfg.max_length), texts)
    inputs = {QUERY_TOWER: (q_ids, q_mask), TEXT_TOWER: (p_ids, p_mask)}
    if model.cfg.multimodal:
        pixels = np.stack([image_to_pixels(b, image_cfg) for b in rows.images if b])
        n = len(pixels)
        text = model.encode_product_text(torch.from_numpy(p_ids[:n]), torch.from_numpy(p_mask[:n])).numpy()
        image = model.encode_image(torch.from_numpy(pixels)).numpy()
        rng = np.random.default_rng(0)
        masks = rng.integers(0, 2, size=(2, n, 1)).astype(np.float32)
        masks[0, masks[1, :, 0] == 0] = 1.0  # never both missing
        inputs.update({IMAGE_TOWER: (pixels,), FUSION: (text, image, masks[0], masks[1]),
                       IMAGE_QUERY_HEAD: (image,)})
    report = {}
    for name, spec in specs.items():
        arrays = inputs[name]
        expected = WRAPPERS[name](model)(*(torch.from_numpy(a) for a in arrays)).numpy()
        got = session(graphs_dir / f"{name}.onnx").run(None, dict(zip([t.name for t in spec.inputs], arrays)))[0]
        report[name] = _compare(expected, got)
        logger.info("parity %-16s fp32 vs torch: max abs %.2e, min cosine %.7f", name,
                    report[name]["max_abs"], report[name]["min_cosine"])
        if (report[name]["max_abs"] > FP32_TOLERANCE["max_abs"]
                or report[name]["min_cosine"] < FP32_TOLERANCE["min_cosine"]):
            raise ParityError(f"{name}: ONNX differs from PyTorch beyond {FP32_TOLERANCE}: {report[name]}")
    return report


def pipeline_quality(reference: dict, checkpoint: Path, graphs_dir: Path, rows: Rows) -> dict[str, float]:
    """A variant's end-to-end embeddings (tokenizer to fusion) against PyTorch's."""
    pipe = OnnxPipeline(checkpoint, graphs_dir)
    queries = pipe.embed_queries(rows.queries)
    products = pipe.embed_products(rows.titles, rows.descriptions, rows.images)
    q, p = _compare(reference["queries"], queries), _compare(reference["products"], products)
    out = {"query_mean_cosine": q["mean_cosine"], "query_min_cosine": q["min_cosine"],
           "product_mean_cosine": p["mean_cosine"], "product_min_cosine": p["min_cosine"],
           "mean_cosine": min(q["mean_cosine"], p["mean_cosine"]),
           "top10_overlap": top_k_overlap(queries, products, reference["queries"], reference["products"])}
    if "images" in reference:
        images = pipe.embed_images([b for b in rows.images if b])
        out["image_mean_cosine"] = _compare(reference["images"], images)["mean_cosine"]
    return out
