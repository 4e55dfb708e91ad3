import pytest
import torch
import torch.nn.functional as F

from training.config import ModelCfg
from training.factory import create_model, create_tokenizer, get_model_config, list_models, preprocess_config


def _inputs(model, tokenizer, n=3):
    texts = ["Puma Men's Black T-shirt", "women's red kurta", "Titan Women Silver Watch"][:n]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    size = preprocess_config(model.cfg)["image"]["image_size"] if model.cfg.multimodal else 0
    return batch["input_ids"], batch["attention_mask"], torch.randn(n, 3, size, size) if size else None


@pytest.mark.parametrize("name", [n for n in list_models() if n != "test-tiny"])
def test_every_config_builds_unit_vectors_of_embed_dim(name):
    cfg = get_model_config(name)
    model = create_model(name, load_pretrained=False).eval()
    tokenizer = create_tokenizer(name)
    ids, mask, pixels = _inputs(model, tokenizer)
    with torch.no_grad():
        query = model.encode_query(ids, mask)
        product = model.encode_product(ids, mask, pixels)
    assert query.shape == product.shape == (3, cfg.embed_dim)
    torch.testing.assert_close(query.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(product.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("kind", ["concat", "alpha_concat", "mlp"])
def test_a_product_embeds_without_its_image_or_its_text(kind):
    cfg = get_model_config("test-tiny")
    cfg.fusion_cfg.kind = kind
    model = create_model("test-tiny", cfg=cfg, load_pretrained=False).eval()
    ids, mask, pixels = _inputs(model, create_tokenizer("test-tiny"))
    with torch.no_grad():
        full = model.encode_product(ids, mask, pixels)
        text_only = model.encode_product(ids, mask, pixels, image_mask=torch.zeros(3))
        image_only = model.encode_product(ids, mask, pixels, text_mask=torch.zeros(3))
        other_pixels = model.encode_product(ids, mask, torch.randn_like(pixels), image_mask=torch.zeros(3))
    for emb in (text_only, image_only):
        assert emb.shape == full.shape and torch.isfinite(emb).all()
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
        assert not torch.allclose(emb, full)
    # A hidden image is ignored, whatever pixels stand in for it.
    torch.testing.assert_close(text_only, other_pixels)


def test_alpha_concat_weights_the_parts_and_learns_alpha_only_when_asked():
    cfg = get_model_config("mm3-alpha")
    assert create_model("mm3-alpha", load_pretrained=False).fusion.alpha_logit.requires_grad
    cfg.fusion_cfg.learn_alpha, cfg.fusion_cfg.alpha = False, 0.8
    model = create_model("mm3-alpha", cfg=cfg, load_pretrained=False)
    assert not any("alpha" in n for n, _ in model.named_parameters())
    assert model.fusion.alpha == pytest.approx(0.8)
    t, i = F.normalize(torch.randn(2, cfg.part_dim), dim=-1), F.normalize(torch.randn(2, cfg.part_dim), dim=-1)
    fused = model.fuse(t, i, torch.ones(2), torch.ones(2))
    half = cfg.part_dim
    ratio = fused[:, :half].norm(dim=-1) / fused[:, half:].norm(dim=-1)
    torch.testing.assert_close(ratio, torch.full((2,), 0.8 / 0.2))


def test_four_tower_query_uses_a_clip_text_encoder_and_three_tower_has_none():
    four = create_model("mm4-concat", load_pretrained=False)
    three = create_model("mm3-concat", load_pretrained=False)
    assert hasattr(four, "clip_text") and hasattr(four, "query_fusion")
    assert not hasattr(three, "clip_text")


def test_separate_query_and_product_bert_when_not_shared():
    cfg = get_model_config("test-tiny")
    cfg.share_text_encoder = False
    model = create_model("test-tiny", cfg=cfg, load_pretrained=False)
    assert model.query_bert is not model.product_bert
    shared = create_model("test-tiny", load_pretrained=False)
    assert shared.query_bert is shared.product_bert


def test_unknown_model_and_unknown_config_keys_are_errors():
    with pytest.raises(ValueError, match="mm3-concat"):
        get_model_config("no-such-model")
    with pytest.raises(TypeError):
        ModelCfg(text_cfg={"modle": "typo"})


def test_offline_minilm_weights_load_and_embed_sensibly():
    model = create_model("text-only").eval()  # real all-MiniLM-L6-v2 weights, from the local package
    tokenizer = create_tokenizer("text-only")
    texts = ["red dress for women", "crimson gown for ladies", "laptop battery charger"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = F.normalize(model.query_bert(batch["input_ids"], batch["attention_mask"]), dim=-1)
    sims = pooled @ pooled.T
    assert sims[0, 1] > sims[0, 2] + 0.2, sims


def test_half_precision_pretrained_weights_train_in_fp32(tmp_path):
    # transformers 5 keeps the dtype of a half-precision file; the towers must still train and export in fp32.
    from transformers import AutoModel

    from training.factory import save_checkpoint
    from training.pretrained import resolve_text_encoder

    half = tmp_path / "minilm-fp16"
    AutoModel.from_pretrained(resolve_text_encoder("all-MiniLM-L6-v2")).half().save_pretrained(half)
    create_tokenizer("test-tiny").save_pretrained(half)
    cfg = get_model_config("text-only")
    cfg.text_cfg.model = str(half)
    model = create_model("text-only", cfg=cfg)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    checkpoint = save_checkpoint(model, create_tokenizer("text-only", cfg=cfg), tmp_path / "ckpt")
    reloaded = create_model(checkpoint)
    assert {p.dtype for p in reloaded.parameters()} == {torch.float32}


def test_device_resolution():
    from training.encode import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no CUDA GPU"):
            resolve_device("cuda")
