"""The served graphs: each tower of a checkpoint as its own ONNX file, with named I/O.

Tensor names chosen here are the names in every config.pbtxt and in the client, so they are
defined once, as GraphSpec data, and everything else reads them from `graph_specs(cfg)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from training.config import ModelCfg
from training.model import ProductSearchModel

logger = logging.getLogger(__name__)

OPSET = 17  # the legacy exporter's opset: ORT transformer fusion and TensorRT 8.6+/10 both take it


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton dtype: TYPE_INT64, TYPE_FP32, ...
    dims: tuple[int, ...]  # without the batch dimension; -1 = dynamic


@dataclass(frozen=True)
class GraphSpec:
    name: str  # Triton model name and ONNX file stem
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    text: bool = False  # a BERT graph: transformer fusion applies, seq axis is dynamic


class Tower(nn.Module):
    """One `encode_*` method of the model as a module: what torch.onnx.export traces."""

    def __init__(self, model: ProductSearchModel, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *inputs):
        return getattr(self.model, self.method)(*inputs)


class Fusion(nn.Module):
    """Masks arrive as (B, 1): Triton batches tensors with at least one dimension."""

    def __init__(self, model: ProductSearchModel):
        super().__init__()
        self.model = model

    def forward(self, text_embedding, image_embedding, text_mask, image_mask):
        return self.model.fuse(text_embedding, image_embedding, text_mask[:, 0], image_mask[:, 0])


WRAPPERS = {
    "query_tower": lambda model: Tower(model, "encode_query"),
    "text_tower": lambda model: Tower(model, "encode_product_text"),
    "image_tower": lambda model: Tower(model, "encode_image"),
    "fusion": Fusion,
    "image_query_head": lambda model: Tower(model, "encode_image_query"),
}


def graph_specs(cfg: ModelCfg, image_size: int | None) -> dict[str, GraphSpec]:
    """The graphs a model config exports, by name."""
    ids = (TensorSpec("input_ids", "TYPE_INT64", (-1,)), TensorSpec("attention_mask", "TYPE_INT64", (-1,)))
    dim, part = cfg.embed_dim, cfg.part_dim
    specs = {
        "query_tower": GraphSpec("query_tower", ids, (TensorSpec("query_embedding", "TYPE_FP32", (dim,)),), True),
        "text_tower": GraphSpec("text_tower", ids, (TensorSpec("text_embedding", "TYPE_FP32", (part,)),), True),
    }
    if cfg.multimodal:
        pixels = TensorSpec("pixel_values", "TYPE_FP32", (3, image_size, image_size))
        image = TensorSpec("image_embedding", "TYPE_FP32", (part,))
        mask = (TensorSpec("text_mask", "TYPE_FP32", (1,)), TensorSpec("image_mask", "TYPE_FP32", (1,)))
        specs["image_tower"] = GraphSpec("image_tower", (pixels,), (image,))
        specs["fusion"] = GraphSpec("fusion", (TensorSpec("text_embedding", "TYPE_FP32", (part,)), image, *mask),
                                    (TensorSpec("product_embedding", "TYPE_FP32", (dim,)),))
        specs["image_query_head"] = GraphSpec("image_query_head", (image,),
                                              (TensorSpec("image_query_embedding", "TYPE_FP32", (dim,)),))
    return specs


def example_inputs(spec: GraphSpec, batch: int = 2, seq: int = 8) -> tuple[torch.Tensor, ...]:
    out = []
    for t in spec.inputs:
        shape = (batch, *(seq if d == -1 else d for d in t.dims))
        if t.dtype == "TYPE_INT64":
            out.append(torch.ones(shape, dtype=torch.long))
        else:
            out.append(torch.rand(shape))
    return tuple(out)


def export_graph(model: ProductSearchModel, spec: GraphSpec, path: Path) -> Path:
    """torch -> ONNX with named I/O, a dynamic batch axis, and a dynamic sequence axis for text."""
    wrapper = WRAPPERS[spec.name](model).eval()
    dynamic = {}
    for t in (*spec.inputs, *spec.outputs):
        axes = {0: "batch"}
        if -1 in t.dims:
            axes[1 + t.dims.index(-1)] = "sequence"
        dynamic[t.name] = axes
    path.parent.mkdir(parents=True, exist_ok=True)
    # The legacy exporter: its BERT graphs are the ones ORT's transformer optimizer can fuse, and
    # the fused attention fast path of nn.MultiheadAttention (the ViT) must stay off to trace.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            torch.onnx.export(
                wrapper, example_inputs(spec), str(path), dynamo=False, opset_version=OPSET,
                input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                dynamic_axes=dynamic, do_constant_folding=True,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    logger.info("exported %s -> %s", spec.name, path)
    return path
