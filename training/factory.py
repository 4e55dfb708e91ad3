"""The one way to build a model: from a config name, a config file, or a checkpoint directory.

A checkpoint directory holds everything `export/` needs and nothing it has to guess:
    config.json          {"model_cfg": ..., "preprocess_cfg": ..., "train_cfg": ..., "metrics": ...}
    model.safetensors    all tower weights
    text_encoder/        the BERT architecture (config.json), so it rebuilds without the hub
    tokenizer/           the BERT tokenizer (tokenizer.json: what Triton's tokenizer model loads)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from .config import ModelCfg
from .model import ProductSearchModel
from .pretrained import image_preprocess_cfg, resolve_text_encoder

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR / "open_clip")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TEXT_ENCODER_DIR = "text_encoder"
TOKENIZER_DIR = "tokenizer"


def list_models() -> list[str]:
    """Names of the model configs in training/model_configs/."""
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def is_checkpoint(path: str | os.PathLike) -> bool:
    """One of ours; a Hugging Face model directory has the same two file names."""
    config, weights = Path(path) / CONFIG_FILE, Path(path) / WEIGHTS_FILE
    if not (config.is_file() and weights.is_file()):
        return False
    try:
        return "model_cfg" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def get_model_config(name_or_path: str | os.PathLike) -> ModelCfg:
    """A ModelCfg from a config name, a .json file, or a checkpoint directory."""
    path = Path(name_or_path)
    if path.is_dir():
        return ModelCfg(**json.loads((path / CONFIG_FILE).read_text())["model_cfg"])
    if path.suffix == ".json" and path.is_file():
        return ModelCfg(**json.loads(path.read_text()))
    config_file = MODEL_CONFIG_DIR / f"{name_or_path}.json"
    if not config_file.is_file():
        raise ValueError(f"unknown model {str(name_or_path)!r}: not a checkpoint directory or a .json "
                         f"file, and not one of {', '.join(list_models())}")
    return ModelCfg(**json.loads(config_file.read_text()))


def _build_bert(source: str, load_weights: bool, attn_implementation: str | None) -> torch.nn.Module:
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if not load_weights:
        return AutoModel.from_config(AutoConfig.from_pretrained(source), add_pooling_layer=False, **kwargs).float()
    # transformers prints a table of the checkpoint's pooler weights (unused: the towers pool
    # themselves) and a progress bar per load; one line of ours says what matters.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        # fp32 whatever the file holds: transformers 5 keeps a half-precision checkpoint's dtype,
        # and the towers train and export in fp32.
        model = AutoModel.from_pretrained(source, add_pooling_layer=False, **kwargs).float()
        model.config.torch_dtype = torch.float32  # what checkpoints' text_encoder/config.json then says
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    logger.info("text encoder: pretrained weights from %s (its pooler, if any, is unused)", source)
    return model


def _build_clip(cfg: ModelCfg, load_weights: bool) -> torch.nn.Module | None:
    if not cfg.multimodal:
        return None
    vcfg = cfg.vision_cfg
    clip = open_clip.create_model(
        vcfg.model,
        pretrained=vcfg.pretrained if load_weights else None,
        force_custom_text=True,  # gives a `.text` tower module beside `.visual`
    )
    if cfg.towers == 4:
        context = clip.text.context_length
        if cfg.text_cfg.query_max_length > context:
            raise ValueError(f"query_max_length {cfg.text_cfg.query_max_length} exceeds the CLIP text "
                             f"context length {context} of {vcfg.model}")
    else:
        del clip.text  # a 3-tower model has no CLIP text encoder
    return clip


def create_model(name_or_dir: str | os.PathLike, *, load_pretrained: bool = True,
                 attn_implementation: str | None = None, cfg: ModelCfg | None = None) -> ProductSearchModel:
    """Build a ProductSearchModel.

    name_or_dir: a config name (see `list_models()`), a config .json file, or a checkpoint
        directory (then the trained weights are loaded and nothing is downloaded).
    load_pretrained: load the pretrained BERT / open_clip weights named by the config; False
        builds the architecture with random weights (tests, or before loading a checkpoint).
    attn_implementation: passed to transformers ("eager" is what ONNX transformer fusion needs).
    cfg: an already resolved ModelCfg (e.g. with overrides applied); name_or_dir is then only
        used as the source of pretrained weights.
    """
    checkpoint = is_checkpoint(name_or_dir)
    cfg = cfg or get_model_config(name_or_dir)
    if checkpoint:
        text_source = str(Path(name_or_dir) / TEXT_ENCODER_DIR)
        load_pretrained = False
    else:
        text_source = resolve_text_encoder(cfg.text_cfg.model)
    query_bert = _build_bert(text_source, load_pretrained, attn_implementation)
    product_bert = None
    if not cfg.share_text_encoder:
        product_bert = _build_bert(text_source, load_pretrained, attn_implementation)
    model = ProductSearchModel(cfg, query_bert, product_bert, _build_clip(cfg, load_pretrained))
    if checkpoint:
        state = load_file(str(Path(name_or_dir) / WEIGHTS_FILE))
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Shared BERT weights are saved once; everything else must match exactly.
        missing = [k for k in missing if not (cfg.share_text_encoder and k.startswith("product_bert."))]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {name_or_dir} does not match its config: "
                               f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        logger.info("loaded checkpoint %s", name_or_dir)
    return model


def create_tokenizer(name_or_dir: str | os.PathLike, cfg: ModelCfg | None = None) -> PreTrainedTokenizerBase:
    """The (fast) BERT tokenizer for a config name or checkpoint directory."""
    if is_checkpoint(name_or_dir):
        return AutoTokenizer.from_pretrained(str(Path(name_or_dir) / TOKENIZER_DIR))
    cfg = cfg or get_model_config(name_or_dir)
    return AutoTokenizer.from_pretrained(resolve_text_encoder(cfg.text_cfg.model))


def preprocess_config(cfg: ModelCfg) -> dict:
    """Everything a server needs to turn raw inputs into tower inputs (saved in checkpoints)."""
    image = None
    if cfg.multimodal:
        clip = open_clip.get_model_config(cfg.vision_cfg.model)
        size = clip["vision_cfg"]["image_size"]
        image = image_preprocess_cfg(cfg.vision_cfg.model, cfg.vision_cfg.pretrained, size,
                                     cfg.vision_cfg.resize_mode)
    return {
        "tokenizer_dir": TOKENIZER_DIR,
        "max_length": cfg.text_cfg.max_length,
        "query_max_length": cfg.text_cfg.query_max_length,
        "image": image,
    }


def save_checkpoint(model: ProductSearchModel, tokenizer: PreTrainedTokenizerBase,
                    out_dir: str | os.PathLike, **extra) -> Path:
    """Write a self-contained checkpoint directory (see module docstring); returns its path.

    Files are written under temporary names and renamed, so an interrupted save never leaves a
    half-written checkpoint behind.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if not (model.cfg.share_text_encoder and k.startswith("product_bert."))}
    save_file(state, str(out / (WEIGHTS_FILE + ".tmp")))
    model.query_bert.bert.config.save_pretrained(out / TEXT_ENCODER_DIR)
    tokenizer.save_pretrained(out / TOKENIZER_DIR)
    config = {"model_cfg": model.cfg.to_dict(), "preprocess_cfg": preprocess_config(model.cfg), **extra}
    (out / (CONFIG_FILE + ".tmp")).write_text(json.dumps(config, indent=2) + "\n")
    os.replace(out / (WEIGHTS_FILE + ".tmp"), out / WEIGHTS_FILE)
    os.replace(out / (CONFIG_FILE + ".tmp"), out / CONFIG_FILE)
    return out


def load_checkpoint_config(checkpoint_dir: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint_dir) / CONFIG_FILE).read_text())
