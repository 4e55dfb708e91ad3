"""The served computation, in-process: tokenizer + preprocessing + the ONNX graphs on ONNX Runtime.

It is what the Triton ensembles run, step for step, built from the same files; parity checks and
the in-process baseline of the benchmarks use it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from training.preprocess import image_to_pixels, load_tokenizer, product_text, tokenize


def session(path: Path | str, threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",)):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=list(providers))


class OnnxPipeline:
    """Query and product embeddings from a checkpoint's exported graphs (one variant)."""

    def __init__(self, checkpoint: Path | str, graphs_dir: Path | str, threads: int = 0):
        config = json.loads((Path(checkpoint) / "config.json").read_text())
        pre = config["preprocess_cfg"]
        tokenizer_json = str(Path(checkpoint) / pre["tokenizer_dir"] / "tokenizer.json")
        self.image_cfg = pre["image"]
        # Padded to the longest text of each batch, as the CPU flavour's towers do.
        self.query_tokenizer = load_tokenizer(tokenizer_json, pre["query_max_length"], pad_to_longest=True)
        self.product_tokenizer = load_tokenizer(tokenizer_json, pre["max_length"], pad_to_longest=True)
        self.sessions = {p.stem: session(p, threads) for p in sorted(Path(graphs_dir).glob("*.onnx"))}

    def run(self, graph: str, **inputs: np.ndarray) -> np.ndarray:
        return self.sessions[graph].run(None, inputs)[0]

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        ids, mask = tokenize(self.query_tokenizer, list(texts))
        return self.run("query_tower", input_ids=ids, attention_mask=mask)

    def embed_products(self, titles: Sequence[str], descriptions: Sequence[str],
                       images: Sequence[bytes | None] | None = None) -> np.ndarray:
        """Products from raw fields; an image of None (or no images at all) is a missing image."""
        ids, mask = tokenize(self.product_tokenizer, [product_text(t, d) for t, d in zip(titles, descriptions)])
        text = self.run("text_tower", input_ids=ids, attention_mask=mask)
        if "fusion" not in self.sessions:
            return text
        n, size = len(ids), self.image_cfg["image_size"]
        images = images if images is not None else [None] * n
        pixels = np.zeros((n, 3, size, size), dtype=np.float32)
        image_mask = np.zeros((n, 1), dtype=np.float32)
        for i, data in enumerate(images):
            if data:
                pixels[i] = image_to_pixels(data, self.image_cfg)
                image_mask[i] = 1.0
        text_mask = np.asarray([[1.0 if product_text(t, d) else 0.0] for t, d in zip(titles, descriptions)],
                               dtype=np.float32)
        image = self.run("image_tower", pixel_values=pixels)
        return self.run("fusion", text_embedding=text, image_embedding=image,
                        text_mask=text_mask, image_mask=image_mask)

    def embed_images(self, images: Sequence[bytes]) -> np.ndarray:
        """Image queries: where a photo lands in the product space."""
        pixels = np.stack([image_to_pixels(data, self.image_cfg) for data in images])
        return self.run("image_query_head", image_embedding=self.run("image_tower", pixel_values=pixels))
