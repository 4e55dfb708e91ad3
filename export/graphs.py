"""The served graphs: each tower of a checkpoint as its own ONNX file, with named I/O.

The names and shapes come from core.specs (the one place every config.pbtxt, Triton model and
client reads them from); this module turns the model's `encode_*` methods into those graphs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from core.specs import (
    FUSION,
    IMAGE_QUERY_HEAD,
    IMAGE_TOWER,
    QUERY_TOWER,
    TEXT_TOWER,
    GraphSpec,
    TensorSpec,
    weights_digest,
)
from core.specs import graph_specs as core_graph_specs
from training.config import ModelCfg
from training.model import ProductSearchModel

logger = logging.getLogger(__name__)

OPSET = 17  # the legacy exporter's opset: ORT transformer fusion and TensorRT 8.6+/10 both take it
GRAPHS_ROOT = Path("build") / "graphs"  # export's own output, never the checkpoint folder


def graphs_dir_for(checkpoint: Path | str, root: Path | str = GRAPHS_ROOT) -> Path:
    """Where a checkpoint's graphs live: one folder per weights content (`<root>/<name>-<digest>/<variant>/`).

    A retrained checkpoint gets a new folder, so no variant is ever rebuilt from, or mistaken for,
    the graphs of older weights (file times cannot say that).
    """
    return Path(root) / f"{Path(checkpoint).resolve().name}-{weights_digest(checkpoint)}"


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
    QUERY_TOWER: lambda model: Tower(model, "encode_query"),
    TEXT_TOWER: lambda model: Tower(model, "encode_product_text"),
    IMAGE_TOWER: lambda model: Tower(model, "encode_image"),
    FUSION: Fusion,
    IMAGE_QUERY_HEAD: lambda model: Tower(model, "encode_image_query"),
}

__all__ = ["GRAPHS_ROOT", "GraphSpec", "TensorSpec", "export_graph", "graph_specs", "graphs_dir_for", "weights_digest"]


def graph_specs(cfg: ModelCfg, image_size: int | None) -> dict[str, GraphSpec]:
    """The graphs a model config exports, by name (core.specs holds the names and shapes)."""
    return core_graph_specs(cfg.embed_dim, cfg.part_dim, cfg.multimodal, image_size)


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
