"""The served computation, in-process: tokenizer + preprocessing + the ONNX graphs on ONNX Runtime.

It is what the Triton ensembles run, step for step, built from the same files; parity checks, the
in-process baseline of the benchmarks and the GPU bench use it. Torch-free (onnxruntime + core).

    GraphRunner   the tower graphs of one variant on one execution provider: the query tower, and
                  the product as the ensemble computes it, fusion(text_tower, image_tower), with
                  plain run() or with IOBinding (intermediate outputs stay on the device)
    OnnxPipeline  raw strings and image bytes in, embeddings out (tokenizing and decoding first)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from core.preprocess import image_to_pixels, load_tokenizer, product_text, tokenize
from core.specs import (
    ATTENTION_MASK,
    FUSION,
    IMAGE_EMBEDDING,
    IMAGE_MASK,
    IMAGE_QUERY_HEAD,
    IMAGE_TOWER,
    INPUT_IDS,
    PIXEL_VALUES,
    QUERY_TOWER,
    TEXT_EMBEDDING,
    TEXT_MASK,
    TEXT_TOWER,
)

PROVIDERS = {"cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"], "cpu": ["CPUExecutionProvider"]}
LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


def session(path: Path | str, threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",),
            level: str = "all") -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=list(providers))


class GraphRunner:
    """The graphs of one folder (`<name>.onnx`) on one device; feeds are dicts keyed by core.specs names."""

    def __init__(self, graphs_dir: Path | str, device: str = "cpu", threads: int = 0, level: str = "all"):
        self.device = device
        self.sessions = {p.stem: session(p, threads, PROVIDERS[device], level)
                         for p in sorted(Path(graphs_dir).glob("*.onnx"))}
        self.providers = {name: s.get_providers() for name, s in self.sessions.items()}

    @property
    def multimodal(self) -> bool:
        return FUSION in self.sessions

    def run(self, graph: str, feeds: dict, to_host: bool = True, bind: bool = False):
        """One graph. With `bind`, feeds are OrtValues (see `upload`) and the output stays on the
        device unless `to_host`; without, numpy in and numpy out."""
        sess = self.sessions[graph]
        if not bind:
            return sess.run(None, feeds)[0]
        binding = sess.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(sess.get_outputs()[0].name, "cpu" if to_host else self.device)
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
        out = binding.get_outputs()[0]
        return out.numpy() if to_host else out

    def upload(self, arrays: dict[str, np.ndarray]) -> dict[str, ort.OrtValue]:
        return {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), self.device, 0) for k, v in arrays.items()}

    def query(self, feeds: dict, bind: bool = False) -> np.ndarray:
        """feeds: INPUT_IDS, ATTENTION_MASK."""
        return self.run(QUERY_TOWER, {k: feeds[k] for k in (INPUT_IDS, ATTENTION_MASK)}, bind=bind)

    def products(self, feeds: dict, bind: bool = False, parts: dict | None = None) -> np.ndarray:
        """feeds: INPUT_IDS, ATTENTION_MASK, and for a multimodal model PIXEL_VALUES, TEXT_MASK, IMAGE_MASK.

        `parts`, when given, receives the text and image embeddings too (host arrays; not with `bind`).
        """
        text = self.run(TEXT_TOWER, {k: feeds[k] for k in (INPUT_IDS, ATTENTION_MASK)}, to_host=not bind,
                        bind=bind)
        if not self.multimodal:
            return text.numpy() if bind else text
        image = self.run(IMAGE_TOWER, {PIXEL_VALUES: feeds[PIXEL_VALUES]}, to_host=not bind, bind=bind)
        if parts is not None:
            parts.update({TEXT_EMBEDDING: text, IMAGE_EMBEDDING: image})
        return self.run(FUSION, {TEXT_EMBEDDING: text, IMAGE_EMBEDDING: image, TEXT_MASK: feeds[TEXT_MASK],
                                 IMAGE_MASK: feeds[IMAGE_MASK]}, bind=bind)

    def image_queries(self, pixels: np.ndarray) -> np.ndarray:
        return self.run(IMAGE_QUERY_HEAD, {IMAGE_EMBEDDING: self.run(IMAGE_TOWER, {PIXEL_VALUES: pixels})})


class OnnxPipeline:
    """Query and product embeddings from a checkpoint's exported graphs (one variant)."""

    def __init__(self, checkpoint: Path | str, graphs_dir: Path | str, threads: int = 0, device: str = "cpu",
                 pad_to_longest: bool = True):
        """pad_to_longest: pad each batch to its longest text, as the CPU flavour's towers do; False pads
        to max_length, as the GPU flavour's tokenizer models (and TensorRT profiles) do."""
        config = json.loads((Path(checkpoint) / "config.json").read_text())
        pre = config["preprocess_cfg"]
        tokenizer_json = str(Path(checkpoint) / pre["tokenizer_dir"] / "tokenizer.json")
        self.image_cfg = pre["image"]
        self.query_tokenizer = load_tokenizer(tokenizer_json, pre["query_max_length"], pad_to_longest)
        self.product_tokenizer = load_tokenizer(tokenizer_json, pre["max_length"], pad_to_longest)
        self.graphs = GraphRunner(graphs_dir, device, threads)
        self.sessions = self.graphs.sessions

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        ids, mask = tokenize(self.query_tokenizer, list(texts))
        return self.graphs.query({INPUT_IDS: ids, ATTENTION_MASK: mask})

    def product_feeds(self, titles: Sequence[str], descriptions: Sequence[str],
                      images: Sequence[bytes | None] | None = None) -> dict[str, np.ndarray]:
        """The graph inputs of products from raw fields; an image of None (or no images) is a missing image."""
        texts = [product_text(t, d) for t, d in zip(titles, descriptions)]
        ids, mask = tokenize(self.product_tokenizer, texts)
        feeds = {INPUT_IDS: ids, ATTENTION_MASK: mask}
        if not self.graphs.multimodal:
            return feeds
        n, size = len(ids), self.image_cfg["image_size"]
        images = images if images is not None else [None] * n
        pixels = np.zeros((n, 3, size, size), dtype=np.float32)
        image_mask = np.zeros((n, 1), dtype=np.float32)
        for i, data in enumerate(images):
            if data:
                pixels[i] = image_to_pixels(data, self.image_cfg)
                image_mask[i] = 1.0
        text_mask = np.asarray([[1.0 if t else 0.0] for t in texts], dtype=np.float32)
        return {**feeds, PIXEL_VALUES: pixels, TEXT_MASK: text_mask, IMAGE_MASK: image_mask}

    def embed_products(self, titles: Sequence[str], descriptions: Sequence[str],
                       images: Sequence[bytes | None] | None = None) -> np.ndarray:
        return self.graphs.products(self.product_feeds(titles, descriptions, images))

    def embed_images(self, images: Sequence[bytes]) -> np.ndarray:
        """Image queries: where a photo lands in the product space."""
        return self.graphs.image_queries(np.stack([image_to_pixels(data, self.image_cfg) for data in images]))
