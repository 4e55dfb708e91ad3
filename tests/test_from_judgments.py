"""training/from_judgments.py on the tiny checkpoint: the product side is kept bit for bit (so the indexed
vectors stay valid), the query side learns the judged pairs, and the checkpoint names its product space."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file

from core.catalog import read_catalog
from core.specs import PRODUCT_SPACE_KEY, weights_digest
from training.data import build_product_set
from training.encode import embed_queries
from training.evaluate import product_embeddings
from training.factory import create_model, create_tokenizer
from training.from_judgments import main as from_judgments

LIMIT = 300


def _judgments(path, catalog_path, offset: int = 0):
    """Made-up shopper words for real products: a judged query names a product its words do not describe, so
    only the judgments can teach the pair."""
    df, _ = read_catalog(catalog_path, limit=LIMIT)
    ids = df["product_id"].astype(str).tolist()
    pairs = [(f"zq{i} wardrobe pick", ids[(7 * i + offset) % len(ids)]) for i in range(40)]
    path.write_text("".join(json.dumps({"query": q, "kind": "text", "filter": "", "object_id": pid, "rating": 0.9,
                                        "impressions": 9, "clicks": 6}) + "\n" for q, pid in pairs))
    return pairs, ids


def test_the_query_tower_learns_judged_pairs_and_keeps_the_product_side_bit_for_bit(tiny_checkpoint, catalog_path,
                                                                                   tmp_path):
    judgments = tmp_path / "judgments.jsonl"
    pairs, ids = _judgments(judgments, catalog_path)
    out = tmp_path / "tuned"
    from_judgments(["--checkpoint", str(tiny_checkpoint), "--judgments", str(judgments), "--out", str(out),
                    "--catalog", str(catalog_path), "--limit", str(LIMIT), "--steps", "60", "--batch-size", "16",
                    "--lr", "3e-4", "--anchor-share", "0.25", "--anchor-products", "200",
                    "--cache-dir", str(tmp_path / "cache")])
    base, tuned = load_file(str(tiny_checkpoint / "model.safetensors")), load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert config[PRODUCT_SPACE_KEY] == weights_digest(tiny_checkpoint)
    assert config["from_judgments"]["judged_queries"] == len(pairs) and not config["from_judgments"]["shuffled"]

    # Product side: every tensor equal, the BERT the base shared now a copy of its own.
    product = [k for k in tuned if not k.startswith(("query_bert.", "query_proj.", "logit_scale"))]
    shared = json.loads((tiny_checkpoint / "config.json").read_text())["model_cfg"]["share_text_encoder"]
    for key in product:
        source = key.replace("product_bert.", "query_bert.", 1) if shared and key.startswith("product_bert.") else key
        assert torch.equal(tuned[key], base[source]), key
    assert any(not torch.equal(tuned[k], base[k]) for k in tuned if k.startswith("query_"))

    # Query side: the judged pairs are found far more often than by the base (their words say nothing).
    df, report = read_catalog(catalog_path, limit=LIMIT)

    def hits(checkpoint) -> int:
        model, tok = create_model(checkpoint).eval(), create_tokenizer(checkpoint)
        image_cfg = json.loads((checkpoint / "config.json").read_text())["preprocess_cfg"]["image"]
        products = build_product_set(df, image_cfg, report, str(tmp_path / "cache"))
        vectors = product_embeddings(checkpoint, model, tok, products, image_cfg, df.attrs["path"],
                                     cache_dir=str(tmp_path / "cache"))
        top = np.argsort(-embed_queries(model, tok, [q for q, _ in pairs]) @ vectors.T, axis=1)[:, :10]
        return sum(ids.index(pid) in row for (_, pid), row in zip(pairs, top))

    before, after = hits(tiny_checkpoint), hits(out)
    assert after >= before + 10, (before, after)

