"""The towers (arXiv:2501.07365): a BERT query tower, a product tower fusing BERT text with a CLIP
image encoder, and for 4tMM a CLIP text encoder on the query side.

Every public `encode_*` returns L2-normalized vectors, so retrieval ranks by inner product.
The export graphs are exactly these methods: query tower, product text tower, image tower, fusion.

Shapes: B = batch, T = tokens, P = part_dim, D = embed_dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import FusionCfg, ModelCfg


class Pooling(nn.Module):
    """Token embeddings (B, T, H) + attention mask (B, T) -> sentence embedding (B, H)."""

    def __init__(self, mode: str = "mean"):
        super().__init__()
        self.mode = mode

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.mode == "cls":
            return tokens[:, 0]
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class BertEncoder(nn.Module):
    """A Hugging Face BERT-family encoder with pooling: (input_ids, attention_mask) -> (B, H)."""

    def __init__(self, bert: nn.Module, pooling: str, trainable_layers: int = -1):
        super().__init__()
        self.bert = bert
        self.pooling = Pooling(pooling)
        self.hidden_size = bert.config.hidden_size
        if trainable_layers >= 0:
            layers = list(bert.encoder.layer)
            frozen = [bert.embeddings, *layers[: len(layers) - trainable_layers]]
            for module in frozen:
                module.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.pooling(tokens, attention_mask)


class Fusion(nn.Module):
    """Two normalized parts (B, P) with presence masks (B,) -> one normalized embedding (B, D).

    A missing part (mask 0) is replaced by a learned vector: a product without a photo, or an
    image query without text, still lands in the shared space.
    """

    def __init__(self, cfg: FusionCfg, part_dim: int, embed_dim: int):
        super().__init__()
        self.kind = cfg.kind
        self.missing = nn.ParameterDict({
            "first": nn.Parameter(torch.zeros(part_dim)),
            "second": nn.Parameter(torch.zeros(part_dim)),
        })
        if cfg.kind == "alpha_concat":
            logit = torch.tensor(math.log(cfg.alpha / (1.0 - cfg.alpha)))
            if cfg.learn_alpha:
                self.alpha_logit = nn.Parameter(logit)
            else:
                self.register_buffer("alpha_logit", logit)
        elif cfg.kind == "mlp":
            self.mlp = nn.Sequential(
                nn.Linear(2 * part_dim, cfg.hidden_dim),
                nn.GELU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(cfg.hidden_dim, embed_dim),
            )

    @property
    def alpha(self) -> float | None:
        return torch.sigmoid(self.alpha_logit).item() if self.kind == "alpha_concat" else None

    def forward(self, first: torch.Tensor, second: torch.Tensor,
                first_mask: torch.Tensor, second_mask: torch.Tensor) -> torch.Tensor:
        m1 = first_mask.to(first.dtype).unsqueeze(-1)
        m2 = second_mask.to(second.dtype).unsqueeze(-1)
        first = m1 * first + (1 - m1) * self.missing["first"]
        second = m2 * second + (1 - m2) * self.missing["second"]
        if self.kind == "alpha_concat":
            alpha = torch.sigmoid(self.alpha_logit)
            fused = torch.cat([alpha * first, (1 - alpha) * second], dim=-1)
        elif self.kind == "mlp":
            fused = self.mlp(torch.cat([first, second], dim=-1))
        else:
            fused = torch.cat([first, second], dim=-1)
        return F.normalize(fused, dim=-1)


class ClipTextEncoder(nn.Module):
    """open_clip's text transformer: (input_ids) -> (B, E). Padding is masked by open_clip itself."""

    def __init__(self, text: nn.Module):
        super().__init__()
        self.text = text
        self.output_dim = text.output_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids)


class ProductSearchModel(nn.Module):
    def __init__(self, cfg: ModelCfg, query_bert: nn.Module, product_bert: nn.Module | None,
                 clip: nn.Module | None):
        """Assemble the towers from built encoders; use `training.factory.create_model`."""
        super().__init__()
        self.cfg = cfg
        tcfg, part, dim = cfg.text_cfg, cfg.part_dim, cfg.embed_dim
        self.query_bert = BertEncoder(query_bert, tcfg.pooling, tcfg.trainable_layers)
        if product_bert is None:
            self.product_bert = self.query_bert
        else:
            self.product_bert = BertEncoder(product_bert, tcfg.pooling, tcfg.trainable_layers)
        hidden = self.query_bert.hidden_size
        # A 3-tower query is one vector matched against both fused parts; a 4-tower query is
        # itself a fusion of two parts.
        self.query_proj = nn.Linear(hidden, part if cfg.towers == 4 else dim)
        self.text_proj = nn.Linear(hidden, part)
        if cfg.multimodal:
            self.image_encoder = clip.visual
            self.image_encoder.requires_grad_(cfg.vision_cfg.trainable)
            self.image_proj = nn.Linear(clip.visual.output_dim, part)
            self.fusion = Fusion(cfg.fusion_cfg, part, dim)
        if cfg.towers == 4:
            self.clip_text = ClipTextEncoder(clip.text)
            self.clip_text_proj = nn.Linear(self.clip_text.output_dim, part)
            self.query_fusion = Fusion(cfg.fusion_cfg, part, dim)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))

    # -- the served towers -------------------------------------------------------------------

    def encode_query(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     clip_input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Query text -> (B, D)."""
        q = self.query_proj(self.query_bert(input_ids, attention_mask))
        if self.cfg.towers < 4:
            return F.normalize(q, dim=-1)
        if clip_input_ids is None:
            clip_input_ids = input_ids * attention_mask  # shared tokenizer: pad id 0 is masked
        c = self.clip_text_proj(self.clip_text(clip_input_ids))
        ones = torch.ones(q.shape[0], dtype=q.dtype, device=q.device)
        return self.query_fusion(F.normalize(q, dim=-1), F.normalize(c, dim=-1), ones, ones)

    def encode_product_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Title + description -> (B, P); the product embedding itself for a text-only model."""
        return F.normalize(self.text_proj(self.product_bert(input_ids, attention_mask)), dim=-1)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalized pixels (B, 3, S, S) -> (B, P)."""
        return F.normalize(self.image_proj(self.image_encoder(pixel_values)), dim=-1)

    def fuse(self, text: torch.Tensor, image: torch.Tensor,
             text_mask: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        """Text part + image part with presence masks (B,) -> product embedding (B, D)."""
        return self.fusion(text, image, text_mask, image_mask)

    def encode_image_query(self, image: torch.Tensor, text_weight: float | None = None) -> torch.Tensor:
        """An image part (B, P) as a query (B, D): where a shopper's photo lands in the product space.

        `text_weight` overrides cfg.image_query_text_weight ("image" mode; the calibration tries several).
        """
        ones = torch.ones(image.shape[0], dtype=image.dtype, device=image.device)
        if self.cfg.image_query == "image":
            weight = self.cfg.image_query_text_weight if text_weight is None else text_weight
            return self.fuse(weight * image, image, ones, ones)
        return self.fuse(torch.zeros_like(image), image, ones - 1, ones)

    def encode_product(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       pixel_values: torch.Tensor | None = None,
                       text_mask: torch.Tensor | None = None,
                       image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """A whole product -> (B, D): the composition the product_encoder ensemble serves."""
        text = self.encode_product_text(input_ids, attention_mask)
        if not self.cfg.multimodal:
            return text
        ones = torch.ones(text.shape[0], dtype=text.dtype, device=text.device)
        image = self.encode_image(pixel_values)
        return self.fuse(text, image,
                         ones if text_mask is None else text_mask,
                         ones if image_mask is None else image_mask)

    @property
    def temperature(self) -> float:
        return 1.0 / self.logit_scale.exp().item()

    def clamp_logit_scale(self) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, self.cfg.max_logit_scale)
