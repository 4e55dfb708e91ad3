"""The model architecture as data: one dataclass per JSON section, built with `Cfg(**d)`.

Unknown keys raise a TypeError, so a typo in a model config fails at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

TOWER_VARIANTS = {
    2: "text-only two-tower: query = BERT, product = BERT on title + description",
    3: "3tMM: query = BERT, product = BERT text fused with a CLIP image encoder",
    4: "4tMM: query = BERT fused with a CLIP text encoder, product = BERT text fused with CLIP image",
}
FUSION_KINDS = ("concat", "alpha_concat", "mlp")
IMAGE_QUERY_MODES = ("learned", "image")


@dataclass
class TextCfg:
    model: str = "all-MiniLM-L6-v2"  # pretrained.TEXT_ENCODERS key, HF hub id, or local directory
    pooling: str = "mean"  # "mean" over tokens or "cls" (first token)
    # product text (title + description) tokens: the fashion catalog has p99 31, max 33 with MiniLM's
    # tokenizer; every token of padding is paid for by training and by every indexed product
    max_length: int = 32
    query_max_length: int = 16  # query tokens
    trainable_layers: int = -1  # top encoder layers to fine-tune; -1 = all, 0 = frozen


@dataclass
class VisionCfg:
    model: str = "vit-tiny-64"  # open_clip model name: built-in (ViT-B-32) or training/model_configs/open_clip/
    pretrained: str | None = None  # open_clip pretrained tag or weights file; None = random init
    resize_mode: str = "pad"  # pad | crop | squash, see pretrained.image_preprocess_cfg
    trainable: bool = True
    # 4-tower only: tokenizer of the CLIP text encoder. "text" reuses the BERT tokenizer (the
    # offline custom configs are built with its vocabulary); "open_clip" (the model's own BPE
    # tokenizer, needed for pretrained CLIP text weights) is not supported yet.
    clip_tokenizer: str = "text"


@dataclass
class FusionCfg:
    kind: str = "concat"  # concat | alpha_concat | mlp
    alpha: float = 0.5  # alpha_concat: initial weight of the text part (1 - alpha for the image)
    learn_alpha: bool = True  # alpha_concat: learn alpha, or keep it fixed
    hidden_dim: int = 512  # mlp: hidden width
    dropout: float = 0.1  # mlp: dropout on the hidden layer


@dataclass
class ModelCfg:
    embed_dim: int = 256  # the shared retrieval space (query and product embeddings)
    towers: int = 3  # 2, 3 or 4: see TOWER_VARIANTS
    share_text_encoder: bool = True  # one BERT for queries and product text, or two copies
    init_logit_scale: float = 2.9957  # log(1 / 0.05): InfoNCE temperature 0.05 at start
    max_logit_scale: float = 4.6052  # log(100): the temperature never drops below 0.01
    # What fills the text slot of an image-only query (photo search): "learned" = the learned
    # missing-text vector, so a photo is matched on the image half alone; "image" = the photo's own
    # image part, which the photo-text (CLIP) loss aligns with product texts, so a photo is matched
    # on both halves: products whose *text* names what the photo shows rank high too.
    image_query: str = "learned"
    # "image" mode: the share of the image part put in the text slot. A retrieval-time choice (no
    # weight depends on it), calibrated after training on held-out photos (training/calibrate.py):
    # 1.0 ranks the photo's own product first for 32% of photos, 0.25 for 79%, with the other
    # same-look products found as well or better (nDCG@10 0.450 vs 0.458).
    image_query_text_weight: float = 1.0
    text_cfg: TextCfg = field(default_factory=TextCfg)
    vision_cfg: VisionCfg | None = field(default_factory=VisionCfg)
    fusion_cfg: FusionCfg = field(default_factory=FusionCfg)

    def __post_init__(self):
        if isinstance(self.text_cfg, dict):
            self.text_cfg = TextCfg(**self.text_cfg)
        if isinstance(self.vision_cfg, dict):
            self.vision_cfg = VisionCfg(**self.vision_cfg)
        if isinstance(self.fusion_cfg, dict):
            self.fusion_cfg = FusionCfg(**self.fusion_cfg)
        if self.towers not in TOWER_VARIANTS:
            raise ValueError(f"towers must be one of {sorted(TOWER_VARIANTS)}, got {self.towers}")
        if self.fusion_cfg.kind not in FUSION_KINDS:
            raise ValueError(f"fusion_cfg.kind must be one of {FUSION_KINDS}, got {self.fusion_cfg.kind!r}")
        if self.image_query not in IMAGE_QUERY_MODES:
            raise ValueError(f"image_query must be one of {IMAGE_QUERY_MODES}, got {self.image_query!r}")
        if self.text_cfg.pooling not in ("mean", "cls"):
            raise ValueError(f"text_cfg.pooling must be 'mean' or 'cls', got {self.text_cfg.pooling!r}")
        if self.towers >= 3 and self.vision_cfg is None:
            raise ValueError(f"a {self.towers}-tower model needs a vision_cfg")
        if self.towers == 2:
            self.vision_cfg = None
        if self.towers == 4 and self.vision_cfg.clip_tokenizer != "text":
            # Training and Triton's tokenizer model would need a second tokenizer (CLIP's BPE).
            raise NotImplementedError("4-tower models with the CLIP text encoder's own tokenizer are not "
                                      "supported yet: use vision_cfg.clip_tokenizer = 'text'")
        if self.embed_dim % 2:
            raise ValueError("embed_dim must be even: concat fusion splits it between two parts")

    @property
    def multimodal(self) -> bool:
        return self.towers >= 3

    @property
    def part_dim(self) -> int:
        """Width of each unimodal part before fusion.

        Concatenations split the shared space in two halves, so that a 3-tower query (one
        vector of embed_dim) can match text and image parts at once; the MLP maps any width.
        """
        if not self.multimodal or self.fusion_cfg.kind == "mlp":
            return self.embed_dim
        return self.embed_dim // 2

    def to_dict(self) -> dict:
        return asdict(self)
