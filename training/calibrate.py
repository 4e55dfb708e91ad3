"""Calibrate how a photo becomes a query, on held-out products, and record it in the checkpoint.

    python -m training.calibrate --checkpoint runs/mm3-concat

A photo query is fuse(w * image part, image part) ("image" mode, see ModelCfg.image_query): the
image part in the text slot lets a photo match products whose *text* names what it shows, and
w sets how much. No trained weight depends on w, so it is chosen after training, on the calibration
products (calibration_indices: the held-out split less every product an evaluation set asks with, so
that no photo scored by training/eval_sets has chosen w), by two measures a shopper notices:
  own@1    the photo's own product ranks first (a shopper photographs what they want to re-buy)
  nDCG@10  the other products of the photo's article type and colour come next (similar items)
The chosen w is the one with the best nDCG@10 among those keeping own@1 >= MIN_OWN_AT_1.
train.py runs this at the end of every multimodal run.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from core.catalog import DEFAULT_CATALOG, read_catalog
from core.metrics import rank, retrieval_metrics, without_query_products
from core.queries import EVAL_SETS, evaluation_query_products

from .data import ProductSet, build_product_set, photo_queries, split_indices
from .encode import embed_image_parts, embed_products
from .factory import CONFIG_FILE, create_model, create_tokenizer, load_checkpoint_config
from .model import ProductSearchModel

logger = logging.getLogger(__name__)
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
MIN_OWN_AT_1 = 0.75


def calibration_indices(products: ProductSet, held_out: np.ndarray, eval_sets=EVAL_SETS) -> np.ndarray:
    """The held-out products less those any evaluation set asks with (its photo queries, the products its text
    queries were drawn from): calibration and evaluation share no query product."""
    asked = evaluation_query_products(eval_sets)
    keep = np.array([products.ids[i] not in asked for i in held_out], dtype=bool)
    logger.info("calibration products: %d held out, %d of them asked by evaluation sets and left out",
                len(held_out), int((~keep).sum()))
    return held_out[keep]


@torch.no_grad()
def calibrate(model: ProductSearchModel, tokenizer, products: ProductSet, held_out: np.ndarray,
              image_cfg: dict) -> dict:
    """The calibration record: the chosen weight, MIN_OWN_AT_1, how many products it was chosen on (the
    `held_out` products that calibration_indices keeps) and one row of measures per weight.

    Without a photo among them (a small catalog slice), the weight stays as configured, no rows, and a warning.
    """
    model.eval()
    indices = calibration_indices(products, held_out)
    record = {"chosen": model.cfg.image_query_text_weight, "min_own_at_1": MIN_OWN_AT_1, "products": len(indices),
              "rows": []}
    photos, same_look = photo_queries(products, indices)
    if not len(photos):
        logger.warning("no photo among the %d calibration products: the photo-query weight stays %.2f, "
                       "uncalibrated", len(indices), record["chosen"])
        return record
    ids = [products.ids[i] for i in indices]
    product_emb = embed_products(model, tokenizer, products, image_cfg, indices)
    image = embed_image_parts(model, products.pixels[photos], image_cfg)  # once; only the query side varies
    photo_ids = [products.ids[i] for i in photos]
    rows = []
    for w in WEIGHTS:
        ranked = rank(model.encode_image_query(image, w).cpu().numpy(), product_emb, ids, k=101)
        own = float(np.mean([r[0] == pid for r, pid in zip(ranked, photo_ids)]))
        others, relevant = without_query_products(ranked, same_look, photo_ids)
        metrics = retrieval_metrics(others, relevant)
        rows.append({"weight": w, "own@1": own, "ndcg@10": metrics["ndcg@10"], "recall@100": metrics["recall@100"]})
    eligible = [r for r in rows if r["own@1"] >= MIN_OWN_AT_1] or rows
    return {**record, "chosen": max(eligible, key=lambda r: r["ndcg@10"])["weight"], "rows": rows}


def calibrate_checkpoint(checkpoint: str | Path, catalog: str = DEFAULT_CATALOG, cache_dir: str = "cache") -> dict:
    """Calibrate a saved checkpoint on its calibration products and write the weight into its config."""
    checkpoint = Path(checkpoint)
    config = load_checkpoint_config(checkpoint)
    train_cfg = config.get("train_cfg", {})
    model, tokenizer = create_model(checkpoint), create_tokenizer(checkpoint)
    if not model.cfg.multimodal or model.cfg.image_query != "image":
        raise ValueError(f"{checkpoint}: only multimodal models with image_query 'image' take a text weight")
    image_cfg = config["preprocess_cfg"]["image"]
    df, report = read_catalog(train_cfg.get("catalog", catalog), limit=train_cfg.get("limit") or None)
    products = build_product_set(df, image_cfg, report, cache_dir)
    _, held_out = split_indices(products.ids, train_cfg.get("val_fraction", 0.05), train_cfg.get("seed", 0))
    record = calibrate(model, tokenizer, products, held_out, image_cfg)
    chosen, rows = record["chosen"], record["rows"]
    config["model_cfg"]["image_query_text_weight"] = chosen
    config["image_query_calibration"] = record
    tmp = checkpoint / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(checkpoint / CONFIG_FILE)
    for row in rows:
        logger.info("image query text weight %.2f: own@1 %.3f, nDCG@10 %.3f, R@100 %.3f%s", row["weight"],
                    row["own@1"], row["ndcg@10"], row["recall@100"], "  <- chosen" if row["weight"] == chosen else "")
    return record


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(prog="python -m training.calibrate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (its config.json is updated)")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog, when the checkpoint does not name one")
    p.add_argument("--cache-dir", default="cache", help="where decoded catalog images are cached")
    args = p.parse_args(argv)
    calibrate_checkpoint(args.checkpoint, args.catalog, args.cache_dir)


if __name__ == "__main__":
    main()
