"""Optimized variants of the exported graphs, each measured against FP32 before it may serve.

- fp32:      the exported graphs as they are (what TensorRT parses; GPU flavour default).
- optimized: ONNX Runtime's transformer fusions (attention, LayerNorm, GELU) for BERT and ViT graphs.
- int8:      dynamic INT8 quantization (per-channel weights) of the optimized tower graphs, for CPUs.
- fp16:      FP16 weights and math with FP32 I/O, for GPUs without TensorRT.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import onnx

from core.specs import IMAGE_TOWER, GraphSpec  # no torch: the GPU bench converts to FP16 with this module

logger = logging.getLogger(__name__)

VARIANTS = ("fp32", "optimized", "int8", "fp16")
# A variant may be the default only if its end-to-end embeddings stay this close to FP32 PyTorch
# and it keeps this share of the FP32 top-10 (measured on real catalog rows by export.parity).
QUALITY_BOUND = {"mean_cosine": 0.99, "top10_overlap": 0.9}


def _copy_graph(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    if src.with_suffix(".onnx.data").exists():
        shutil.copyfile(src.with_suffix(".onnx.data"), dst.with_suffix(".onnx.data"))


def _transformer_type(spec: GraphSpec) -> str | None:
    if spec.text:
        return "bert"
    if spec.name == IMAGE_TOWER:  # fuses a ViT's attention; a CNN tower gets the basic graph optimizations
        return "vit"
    return None


def optimize(src: Path, dst: Path, spec: GraphSpec, num_heads: int, hidden_size: int) -> Path:
    model_type = _transformer_type(spec)
    if model_type is None:
        _copy_graph(src, dst)
        return dst
    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = (num_heads, hidden_size) if model_type == "bert" else (0, 0)
    optimized = optimize_model(str(src), model_type=model_type, num_heads=heads, hidden_size=hidden,
                               opt_level=1, use_gpu=False)
    logger.info("%s: fused operators %s", spec.name,
                {k: v for k, v in optimized.get_fused_operator_statistics().items() if v})
    dst.parent.mkdir(parents=True, exist_ok=True)
    optimized.save_model_to_file(str(dst))
    return dst


def quantize_int8(src: Path, dst: Path, spec: GraphSpec) -> Path:
    if _transformer_type(spec) is None:  # the fusion graphs are a few small matmuls: keep FP32
        _copy_graph(src, dst)
        return dst
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.parent.mkdir(parents=True, exist_ok=True)
    # per_channel: 0.992 cosine on MiniLM vs 0.965 per-tensor (measured here, see DESIGN.md).
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return dst


def to_fp16(src: Path, dst: Path) -> Path:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def build_variant(variant: str, graphs_dir: Path, specs: dict[str, GraphSpec], num_heads: int,
                  hidden_size: int) -> Path:
    """Write `graphs_dir/<variant>/<name>.onnx` for every graph from `graphs_dir/fp32/`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: expected one of {VARIANTS}")
    out = graphs_dir / variant
    for name, spec in specs.items():
        src, dst = graphs_dir / "fp32" / f"{name}.onnx", out / f"{name}.onnx"
        if variant == "fp32":
            continue
        if variant == "optimized":
            optimize(src, dst, spec, num_heads, hidden_size)
        elif variant == "int8":
            optimized = graphs_dir / "optimized" / f"{name}.onnx"
            if not optimized.exists():
                optimize(src, optimized, spec, num_heads, hidden_size)
            quantize_int8(optimized, dst, spec)
        elif variant == "fp16":
            to_fp16(src, dst)
    return out
