"""Every name and shape the served system agrees on, in one place.

Triton model names, the ensembles' inputs and outputs (the repository's public interface, what
client/ calls), the tower graphs and their tensors. Export writes these into every config.pbtxt
and ONNX graph; the client, the Triton models and the benches read them from here. Nothing else
types them. Torch-free.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

# -- the ensembles: raw text and encoded image bytes in, one L2-normalized vector out ----------
QUERY_ENCODER = "query_encoder"  # QUERY -> EMBEDDING
PRODUCT_ENCODER = "product_encoder"  # TITLE, DESCRIPTION (, IMAGE) -> EMBEDDING
IMAGE_ENCODER = "image_encoder"  # IMAGE (a shopper's photo) -> EMBEDDING, in the product space
QUERY, TITLE, DESCRIPTION, IMAGE = "QUERY", "TITLE", "DESCRIPTION", "IMAGE"
EMBEDDING = "EMBEDDING"
STRING = "TYPE_STRING"  # Triton's BYTES: UTF-8 text or encoded image bytes

# -- the preprocessing models (Python backend, KIND_CPU) ---------------------------------------
QUERY_TOKENIZER = "query_tokenizer"
PRODUCT_TOKENIZER = "product_tokenizer"
IMAGE_PREPROCESS = "image_preprocess"  # a product photo; an empty one is a product without a photo
QUERY_IMAGE_PREPROCESS = "query_image_preprocess"  # a query photo: empty is an error

# -- the tower graphs (one ONNX file each) and their tensors -----------------------------------
QUERY_TOWER = "query_tower"
TEXT_TOWER = "text_tower"
IMAGE_TOWER = "image_tower"
FUSION = "fusion"
IMAGE_QUERY_HEAD = "image_query_head"
INPUT_IDS, ATTENTION_MASK, PIXEL_VALUES = "input_ids", "attention_mask", "pixel_values"
TEXT_MASK, IMAGE_MASK = "text_mask", "image_mask"  # 1 = the product has that modality
QUERY_EMBEDDING = "query_embedding"
TEXT_EMBEDDING = "text_embedding"
IMAGE_EMBEDDING = "image_embedding"
PRODUCT_EMBEDDING = "product_embedding"
IMAGE_QUERY_EMBEDDING = "image_query_embedding"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton dtype: TYPE_INT64, TYPE_FP32, TYPE_STRING...
    dims: tuple[int, ...]  # without the batch dimension; -1 = dynamic


@dataclass(frozen=True)
class GraphSpec:
    name: str  # Triton model name and ONNX file stem
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    text: bool = False  # a BERT graph: transformer fusion applies, seq axis is dynamic


QUERY_INPUTS = (TensorSpec(QUERY, STRING, (1,)),)
PRODUCT_TEXT_INPUTS = (TensorSpec(TITLE, STRING, (1,)), TensorSpec(DESCRIPTION, STRING, (1,)))
IMAGE_INPUT = TensorSpec(IMAGE, STRING, (1,))
TEXT_MASK_SPEC = TensorSpec(TEXT_MASK, "TYPE_FP32", (1,))  # Triton batches tensors of at least one dim
IMAGE_MASK_SPEC = TensorSpec(IMAGE_MASK, "TYPE_FP32", (1,))


def graph_specs(embed_dim: int, part_dim: int, multimodal: bool, image_size: int | None) -> dict[str, GraphSpec]:
    """The graphs a model exports, by name: the towers' ONNX I/O and every config.pbtxt's."""
    ids = (TensorSpec(INPUT_IDS, "TYPE_INT64", (-1,)), TensorSpec(ATTENTION_MASK, "TYPE_INT64", (-1,)))
    specs = {
        QUERY_TOWER: GraphSpec(QUERY_TOWER, ids, (TensorSpec(QUERY_EMBEDDING, "TYPE_FP32", (embed_dim,)),), True),
        TEXT_TOWER: GraphSpec(TEXT_TOWER, ids, (TensorSpec(TEXT_EMBEDDING, "TYPE_FP32", (part_dim,)),), True),
    }
    if multimodal:
        if image_size is None:
            raise ValueError("a multimodal model needs the image size of its tower")
        pixels = TensorSpec(PIXEL_VALUES, "TYPE_FP32", (3, image_size, image_size))
        image = TensorSpec(IMAGE_EMBEDDING, "TYPE_FP32", (part_dim,))
        text = TensorSpec(TEXT_EMBEDDING, "TYPE_FP32", (part_dim,))
        specs[IMAGE_TOWER] = GraphSpec(IMAGE_TOWER, (pixels,), (image,))
        specs[FUSION] = GraphSpec(FUSION, (text, image, TEXT_MASK_SPEC, IMAGE_MASK_SPEC),
                                  (TensorSpec(PRODUCT_EMBEDDING, "TYPE_FP32", (embed_dim,)),))
        specs[IMAGE_QUERY_HEAD] = GraphSpec(IMAGE_QUERY_HEAD, (image,),
                                            (TensorSpec(IMAGE_QUERY_EMBEDDING, "TYPE_FP32", (embed_dim,)),))
    return specs


# -- model sets: a repository can serve several trained models side by side (an upgrade) ------
# The default set has the names above; another set's every model carries its tag: query_encoder__v2.
TAG_SEPARATOR = "__"
FINGERPRINT_PARAMETER = "fingerprint"  # ensemble config parameter: which weights and variant it serves
# Ensemble config parameter: the fingerprint of the model whose product vectors the set's queries match (a
# query-side model set names its base; any other names itself).
PRODUCT_SPACE_PARAMETER = "product_space"
PRODUCT_SPACE_KEY = "product_space"  # checkpoint config.json: weights digest of the model whose product side it kept
# Ensemble config parameter (JSON) and checkpoint config key (an object): the hybrid fusion rule for this model
# set's queries (core/fusion_rule.py), fitted on shoppers' judgments (client/fusion_fit.py); absent: the shipped.
FUSION_RULE_PARAMETER = FUSION_RULE_KEY = "fusion_rule"


def model_name(base: str, tag: str = "") -> str:
    """The served name of `base` in the model set `tag` ("" = the default set)."""
    if tag and (TAG_SEPARATOR in tag or not tag.replace("-", "").replace(".", "").isalnum()):
        raise ValueError(f"model set tag {tag!r}: letters, digits, '-' and '.' only")
    return f"{base}{TAG_SEPARATOR}{tag}" if tag else base


REPORT_FILE = "export_report.json"  # in a model repository: what export built, and from which checkpoint


def report_file(tag: str = "") -> str:
    """The export report of model set `tag` in a repository (the default set's: REPORT_FILE)."""
    return REPORT_FILE if not tag else f"export_report{TAG_SEPARATOR}{tag}.json"


def in_model_set(name: str, tag: str = "") -> bool:
    """Whether a served model name belongs to the set `tag`."""
    return name.endswith(TAG_SEPARATOR + tag) if tag else TAG_SEPARATOR not in name


def weights_digest(checkpoint: Path | str) -> str:
    """The first 12 hex digits of the checkpoint weights' SHA-256: what a set of graphs was made from, and the
    first part of a served model's fingerprint."""
    digest = hashlib.sha256()
    with open(Path(checkpoint) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]
