"""Fine-tune the query tower on shoppers' judgments, against the product vectors already indexed.

    python -m training.from_judgments --checkpoint runs/mm3-concat --judgments runs/judgments/judgments.jsonl \\
        --out runs/mm3-concat-q1

Only the query side learns (its BERT, unshared from the product side where the base shares one, and its
projection); the product tower is copied bit for bit, so the vectors the base indexed stay valid. The new
checkpoint records the base's weights digest as its product space (config "product_space"): export serves it
as a query-side model set, and `client/upgrade.py --query-side TAG` promotes it without re-indexing.

What it learns from, after published experience (clicks as positives work, skipped impressions as negatives
hurt: Huang et al., KDD'20; click-trained retrieval drifts off relevance unless labels are smoothed and
relevance-focused negatives kept: Taobao, KDD'21):
- judged text queries (client/judgments.py: the click model's attractiveness, position bias removed): every
  product rated at least --min-rating is a positive, weighted by its rating (a soft label, not a click);
- every catalog product is a negative (the softmax runs over the whole catalog, not over what a shopper skipped);
- anchors: --anchor-share of every batch is the training generator's queries with the product each was written
  from (the committed evaluation sets' products left out), so clicks alone never define relevance and what the
  base knew about the catalog's words stays.

`--shuffle-judgments` pairs each judged query with another query's products: a deliberately harmful candidate,
for checking that the promotion gate refuses one.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from core.catalog import DEFAULT_CATALOG, ColumnMap, read_catalog
from core.queries import evaluation_query_products, generate_queries
from core.specs import PRODUCT_SPACE_KEY, weights_digest

from .data import build_product_set
from .encode import resolve_device, tokenize
from .evaluate import product_embeddings
from .factory import create_model, create_tokenizer, load_checkpoint_config, save_checkpoint

logger = logging.getLogger("training.from_judgments")

TEXT = "text"  # the judgments' kind of a typed query (photos are product-side: nothing to learn here)


def load_judgments(path: Path, ids: list[str], min_rating: float) -> dict[str, list[tuple[int, float]]]:
    """Judged text queries -> [(catalog row, rating)] of products rated at least `min_rating` (in the catalog)."""
    if not path.is_file():
        raise FileNotFoundError(f"no judgments at {path}: run python -m client.judgments --events runs/events.db")
    row = {pid: i for i, pid in enumerate(ids)}
    out: dict[str, list[tuple[int, float]]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            kind, query, product, rating = item["kind"], item["query"], str(item["object_id"]), float(item["rating"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not a judgment line ({exc})") from None
        if kind == TEXT and rating >= min_rating and product in row and query.strip():
            out.setdefault(query, []).append((row[product], rating))
    return out


def shuffled(judged: dict[str, list[tuple[int, float]]], seed: int) -> dict[str, list[tuple[int, float]]]:
    """Each query gets another query's judged products: the clicks of somebody else's search."""
    queries = sorted(judged)
    targets = [judged[q] for q in queries]
    random.Random(seed).shuffle(targets)
    return dict(zip(queries, targets))


def anchors(rows: list[dict], ids: list[str], seed: int, limit: int) -> list[tuple[str, list[tuple[int, float]]]]:
    """The training generator's queries with their source product, away from the evaluation sets' products."""
    held = evaluation_query_products()
    row = {pid: i for i, pid in enumerate(ids)}
    pool = [r for r in rows if str(r["product_id"]) not in held]
    random.Random(seed).shuffle(pool)
    return [(q.text, [(row[q.product_id], 1.0)]) for q in generate_queries(pool[:limit], seed=seed)
            if q.product_id in row]


def soft_nce(queries: torch.Tensor, products: torch.Tensor, scale: torch.Tensor,
             targets: list[list[tuple[int, float]]]) -> torch.Tensor:
    """Cross-entropy over the whole catalog against each query's rating-weighted positives."""
    log_p = (scale * queries @ products.T).log_softmax(dim=-1)
    losses = []
    for i, positives in enumerate(targets):
        rows = torch.tensor([r for r, _ in positives])
        weights = torch.tensor([w for _, w in positives], dtype=log_p.dtype)
        losses.append(-(log_p[i, rows] * weights).sum() / weights.sum())
    return torch.stack(losses).mean()


def query_side_model(checkpoint: Path, device: torch.device):
    """The base model with its product side frozen and, where it shares one BERT, given its own copy of it."""
    model = create_model(checkpoint).to(device)
    if model.cfg.share_text_encoder:
        model.product_bert = copy.deepcopy(model.query_bert)
        model.cfg = dataclasses.replace(model.cfg, share_text_encoder=False)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [*model.query_bert.parameters(), *model.query_proj.parameters()]
    if model.cfg.towers >= 4:  # the 4-tower query side: CLIP's text tower and the query fusion
        trainable += [*model.clip_text.parameters(), *model.clip_text_proj.parameters(),
                      *model.query_fusion.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    return model, trainable


def train(args: argparse.Namespace) -> Path:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = resolve_device(args.device)
    base = Path(args.checkpoint)
    config = load_checkpoint_config(base)
    model, trainable = query_side_model(base, device)
    tokenizer = create_tokenizer(base)
    image_cfg = config["preprocess_cfg"]["image"]
    df, report = read_catalog(args.catalog, ColumnMap.from_args(args), limit=args.limit)
    products = build_product_set(df, image_cfg, report, args.cache_dir)
    ids = products.ids
    # The base's product vectors: what the serving collection holds (export's parity checks say how close).
    vectors = torch.from_numpy(product_embeddings(base, model.eval(), tokenizer, products, image_cfg,
                                                  df.attrs["path"], None, args.cache_dir)).to(device)
    judged = load_judgments(Path(args.judgments), ids, args.min_rating)
    if not judged:
        raise ValueError(f"{args.judgments} holds no text query with a product rated >= {args.min_rating} in "
                         f"{args.catalog}: log more searches (or lower --min-rating)")
    if args.shuffle_judgments:
        judged = shuffled(judged, args.seed)
    judged_items = sorted(judged.items())
    anchor_items = anchors(df.to_dict("records"), ids, args.seed, args.anchor_products) if args.anchor_share else []
    n_anchor = round(args.batch_size * args.anchor_share) if anchor_items else 0
    n_judged = args.batch_size - n_anchor
    logger.info("%d judged queries (%d positives), %d anchor queries; %d + %d per batch, %d steps",
                len(judged_items), sum(len(v) for v in judged.values()), len(anchor_items), n_judged, n_anchor,
                args.steps)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.01)
    scale = model.logit_scale.exp().detach()
    model.train()
    model.product_bert.eval()
    started, losses = time.time(), []
    for _ in tqdm(range(args.steps), desc="query tower", unit="step"):
        batch = rng.sample(judged_items, min(n_judged, len(judged_items)))
        batch += rng.sample(anchor_items, min(n_anchor, len(anchor_items)))
        encoded = tokenize(tokenizer, [q for q, _ in batch], model.cfg.text_cfg.query_max_length, device)
        loss = soft_nce(model.encode_query(**encoded), vectors, scale, [t for _, t in batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    model.eval()
    record = {"base": str(base), "judgments": str(args.judgments), "judged_queries": len(judged_items),
              "positives": sum(len(v) for v in judged.values()), "anchor_queries": len(anchor_items),
              "min_rating": args.min_rating, "anchor_share": args.anchor_share, "steps": args.steps, "lr": args.lr,
              "batch_size": args.batch_size, "seed": args.seed, "shuffled": args.shuffle_judgments,
              "loss_first": round(float(np.mean(losses[:10])), 4), "loss_last": round(float(np.mean(losses[-10:])), 4),
              "seconds": round(time.time() - started, 1)}
    # The product side is the base's, bit for bit: its vectors are the base's, so its product space is the
    # base's own (or the one the base itself inherited).
    space = config.get(PRODUCT_SPACE_KEY) or weights_digest(base)
    extra = {k: v for k, v in config.items() if k not in ("model_cfg", "preprocess_cfg", "metrics")}
    out = save_checkpoint(model.cpu(), tokenizer, args.out, **{**extra, PRODUCT_SPACE_KEY: space,
                                                                "from_judgments": record})
    logger.info("wrote %s: loss %.3f -> %.3f in %.0f s (product space %s)", out, record["loss_first"],
                record["loss_last"], record["seconds"], space)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.from_judgments", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the serving model's checkpoint (its product side is kept)")
    p.add_argument("--judgments", required=True, help="judgments.jsonl written by python -m client.judgments")
    p.add_argument("--out", required=True, help="folder of the new checkpoint")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="the catalog the serving collection indexed")
    p.add_argument("--limit", type=int, default=None, help="only the first N catalog rows (as the index was made)")
    p.add_argument("--min-rating", type=float, default=0.5,
                   help="a judged product is a positive from this attractiveness on (0..1)")
    p.add_argument("--anchor-share", type=float, default=0.5,
                   help="share of every batch taken by the training generator's queries (0: judgments only)")
    p.add_argument("--anchor-products", type=int, default=20000, help="catalog rows the anchor queries come from")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="queries per step (judged + anchors)")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate of the query side")
    p.add_argument("--seed", type=int, default=0, help="seeds the batches, the anchors and --shuffle-judgments")
    p.add_argument("--shuffle-judgments", action="store_true",
                   help="pair each judged query with another's products: a harmful candidate, to test the gate")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--cache-dir", default="cache", help="decoded images and product vectors are cached here")
    ColumnMap.add_arguments(p)
    args = p.parse_args(argv)
    if not 0 <= args.anchor_share < 1:
        p.error("--anchor-share must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    train(parse_args(argv))


if __name__ == "__main__":
    main()
