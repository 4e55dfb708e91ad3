"""Train the towers with symmetric InfoNCE on queries generated from the catalog.

    python -m training.train --model mm3-concat --catalog ../shared/data/fashion/catalog.parquet --out runs/mm3

All defaults live in TrainCfg below; `--config run.json` overrides them, and flags override both.
A run resumes exactly where it stopped (same next batch, same next loss) when --out already holds
its training state. Every checkpoint is a complete export-ready directory (see training.factory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .catalog import DEFAULT_CATALOG, ColumnMap, read_catalog
from .data import ProductSet, build_product_set, split_indices
from .encode import embed_products, embed_queries, pixel_tensor, tokenize
from .factory import create_model, create_tokenizer, get_model_config, list_models, preprocess_config, save_checkpoint
from .metrics import rank, retrieval_metrics
from .model import ProductSearchModel
from .queries import Query, generate_queries, generate_query, relevant_ids

logger = logging.getLogger("training")

STATE_FILE = "training_state.pt"
LOG_FILE = "train_log.jsonl"  # one line of losses per step


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainCfg:
    model: str = _f("mm3-concat", "model config name (training/model_configs/), .json file, or checkpoint dir")
    catalog: str = _f(DEFAULT_CATALOG, "catalog file: .parquet, .csv or .jsonl")
    out: str = _f("runs/mm3-concat", "output checkpoint directory; holding a training state, the run resumes")
    limit: int = _f(0, "use only the first N catalog rows (0 = all)")
    val_fraction: float = _f(0.05, "share of products held out for validation (split by id hash)")
    val_queries: int = _f(1000, "number of generated validation queries (disjoint products)")
    epochs: int = _f(1, "passes over the training products")
    max_steps: int = _f(0, "stop after this many steps in total, keeping the schedule (0 = no limit)")
    batch_size: int = _f(128, "products (and queries) per step: the in-batch negatives")
    lr: float = _f(1e-3, "learning rate of the parts trained from scratch (projections, fusion, ViT)")
    lr_pretrained: float = _f(5e-5, "learning rate of pretrained encoders (BERT, a pretrained CLIP)")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases, norms, scalars)")
    warmup_steps: int = _f(50, "linear warm-up steps before cosine decay")
    grad_clip: float = _f(1.0, "max gradient norm (0 = no clipping)")
    text_dropout: float = _f(0.1, "probability of hiding a product's text in training (modality dropout)")
    image_dropout: float = _f(0.1, "probability of hiding a product's image in training (modality dropout)")
    image_query_weight: float = _f(0.5, "weight of the image-query -> product InfoNCE term (multimodal only)")
    hard_negatives: bool = _f(False, "add one hard negative per product: same article type, other colour")
    seed: int = _f(0, "seed for the split, query generation, batching and dropout")
    save_every: int = _f(200, "save a resumable checkpoint every N steps (and at each epoch end)")
    eval_at_start: bool = _f(True, "validate the untrained model first (step 0 of the history in config.json)")
    threads: int = _f(0, "torch intra-op threads (0 = torch default)")
    cache_dir: str = _f("cache", "where decoded catalog images are cached between runs")


def parse_args(argv: list[str] | None = None) -> tuple[TrainCfg, ColumnMap]:
    parser = argparse.ArgumentParser(
        prog="python -m training.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="JSON file of TrainCfg overrides (unknown keys are errors)")
    for f in dataclasses.fields(TrainCfg):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, default=None, help=f.metadata["help"] + f" (default: {f.default})")
    ColumnMap.add_arguments(parser)
    parser.epilog = "models: " + ", ".join(list_models())
    args = parser.parse_args(argv)
    values = {}
    if args.config:
        values = json.loads(Path(args.config).read_text())
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainCfg)
                   if getattr(args, f.name) is not None})
    return TrainCfg(**values), ColumnMap.from_args(args)


# -- loss -------------------------------------------------------------------------------------

def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
             false_negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE: row i of `a` pairs with row i of `b`; other rows are negatives.

    `b` may have extra rows (hard negatives) that only act as negatives for `a`. Entries set in
    `false_negatives` (B, len(b)) are relevant non-pairs and are excluded from the softmax.
    """
    n = a.shape[0]
    logits = logit_scale.exp() * a @ b.T
    if false_negatives is not None:
        logits = logits.masked_fill(false_negatives, float("-inf"))
    target = torch.arange(n, device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :n].T, target))


# -- one step ---------------------------------------------------------------------------------

@dataclass
class Batch:
    queries: list[Query]
    products: np.ndarray  # indices into the ProductSet: positives first, then hard negatives


def make_batch(products: ProductSet, idx: np.ndarray, cfg: TrainCfg, step: int,
               hard_pool: dict[str, list[int]] | None) -> Batch:
    rng = random.Random(cfg.seed * 1_000_003 + step)
    queries = [generate_query(products.attrs[i], products.ids[i], rng) for i in idx]
    extra = []
    if hard_pool is not None:
        for i in idx:
            attrs = products.attrs[i]
            pool = hard_pool.get(attrs["article_type"], [])
            candidates = [j for j in rng.sample(pool, min(8, len(pool)))
                          if products.attrs[j]["base_colour"] != attrs["base_colour"]]
            extra.append(candidates[0] if candidates else rng.randrange(len(products)))
    return Batch(queries, np.concatenate([idx, np.asarray(extra, dtype=idx.dtype)]))


def compute_loss(model: ProductSearchModel, tokenizer, products: ProductSet, batch: Batch,
                 image_cfg: dict | None, cfg: TrainCfg, step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
    torch.manual_seed(cfg.seed * 104_729 + step)  # dropout inside the towers: exact on resume
    n, idx = len(batch.queries), batch.products
    q_batch = tokenize(tokenizer, [q.text for q in batch.queries], model.cfg.text_cfg.query_max_length)
    queries = model.encode_query(**q_batch)
    p_batch = tokenize(tokenizer, [products.texts[i] for i in idx], model.cfg.text_cfg.max_length)
    text = model.encode_product_text(**p_batch)
    losses = {}
    fn = torch.tensor([[j != i and q.matches(products.attrs[idx[j]]) for j in range(len(idx))]
                       for i, q in enumerate(batch.queries)])
    if model.cfg.multimodal:
        image = model.encode_image(pixel_tensor(products.pixels[idx], image_cfg))
        has_image = torch.from_numpy(products.has_image[idx].astype(np.float32))
        # Modality dropout: hide one modality (never both) so that partial products still embed.
        u = torch.rand(len(idx), generator=gen)
        text_mask = (u >= cfg.text_dropout).float()
        image_mask = has_image * (u < 1 - cfg.image_dropout).float()
        text_mask = torch.maximum(text_mask, 1 - image_mask)
        product = model.fuse(text, image, text_mask, image_mask)
        losses["query"] = info_nce(queries, product, model.logit_scale, fn)
        if cfg.image_query_weight > 0 and has_image[:n].any():
            rows = torch.nonzero(has_image[:n]).squeeze(1)
            zeros = torch.zeros(len(rows))
            image_query = model.fuse(text[rows], image[rows], zeros, torch.ones(len(rows)))
            losses["image"] = info_nce(image_query, product[rows], model.logit_scale)
    else:
        losses["query"] = info_nce(queries, text, model.logit_scale, fn)
    losses["loss"] = losses["query"] + cfg.image_query_weight * losses.get("image", 0.0)
    return losses


# -- validation -------------------------------------------------------------------------------

@dataclass
class Validation:
    indices: np.ndarray
    queries: list[Query]
    relevant: list[list[str]]

    @classmethod
    def build(cls, products: ProductSet, indices: np.ndarray, cfg: TrainCfg) -> Validation:
        rows = [{"product_id": products.ids[i], **products.attrs[i]} for i in indices]
        queries = generate_queries(rows, seed=cfg.seed + 1)
        rng = random.Random(cfg.seed + 2)
        if len(queries) > cfg.val_queries:
            queries = rng.sample(queries, cfg.val_queries)
        attrs = [products.attrs[i] for i in indices]
        ids = [products.ids[i] for i in indices]
        return cls(indices, queries, [relevant_ids(q, attrs, ids) for q in queries])

    def run(self, model: ProductSearchModel, tokenizer, products: ProductSet, image_cfg: dict | None) -> dict:
        ids = [products.ids[i] for i in self.indices]
        product_emb = embed_products(model, tokenizer, products, image_cfg, self.indices)
        query_emb = embed_queries(model, tokenizer, [q.text for q in self.queries])
        metrics = retrieval_metrics(rank(query_emb, product_emb, ids), self.relevant)
        if model.cfg.multimodal:
            with_image = self.indices[products.has_image[self.indices]]
            image_emb = embed_products(model, tokenizer, products, image_cfg, with_image, use_text=False)
            image_metrics = retrieval_metrics(rank(image_emb, product_emb, ids),
                                              [[products.ids[i]] for i in with_image])
            metrics.update({f"image_{k}": v for k, v in image_metrics.items()})
        model.train()
        return metrics


# -- the loop ---------------------------------------------------------------------------------

def build_optimizer(model: ProductSearchModel, cfg: TrainCfg) -> torch.optim.Optimizer:
    pretrained_prefixes = ["query_bert.", "product_bert."]
    if model.cfg.multimodal and model.cfg.vision_cfg.pretrained:
        pretrained_prefixes += ["image_encoder.", "clip_text."]
    groups = {(p, d): [] for p in (True, False) for d in (True, False)}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        pretrained = name.startswith(tuple(pretrained_prefixes))
        decay = param.ndim >= 2
        groups[(pretrained, decay)].append(param)
    return torch.optim.AdamW([
        {"params": params, "lr": cfg.lr_pretrained if pretrained else cfg.lr,
         "weight_decay": cfg.weight_decay if decay else 0.0}
        for (pretrained, decay), params in groups.items() if params
    ])


def lr_lambda(total_steps: int, warmup: int):
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return fn


def train(cfg: TrainCfg, columns: ColumnMap | None = None) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    state_file = out / STATE_FILE
    resuming = state_file.is_file()
    if resuming and torch.load(state_file, weights_only=False).get("finished"):
        logger.info("%s is already trained (delete it, or pick another --out, to train again)", out)
        return out
    source = str(out) if resuming else cfg.model
    model_cfg = get_model_config(source)
    image_cfg = preprocess_config(model_cfg)["image"]

    df, report = read_catalog(cfg.catalog, columns, limit=cfg.limit or None)
    products = build_product_set(df, image_cfg, report, cfg.cache_dir)
    report.log()
    train_idx, val_idx = split_indices(products.ids, cfg.val_fraction, cfg.seed)
    validation = Validation.build(products, val_idx, cfg)
    logger.info("%d training products, %d validation products, %d validation queries",
                len(train_idx), len(val_idx), len(validation.queries))
    hard_pool = None
    if cfg.hard_negatives:
        hard_pool = {}
        for i in train_idx:
            hard_pool.setdefault(products.attrs[i]["article_type"], []).append(int(i))

    torch.manual_seed(cfg.seed)  # the random init of the new parts
    model = create_model(source)
    tokenizer = create_tokenizer(source)
    model.train()
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = len(train_idx) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_idx)} training products cannot fill one batch of {cfg.batch_size}")
    scheduled = steps_per_epoch * cfg.epochs
    # max_steps stops the run early without reshaping the LR schedule, like an interruption.
    total = min(scheduled, cfg.max_steps) if cfg.max_steps else scheduled
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(scheduled, cfg.warmup_steps))
    step = 0
    history: list[dict] = []
    if resuming:
        state = torch.load(state_file, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = state["step"], state["history"]
        logger.info("resuming %s at step %d of %d", out, step, total)
    elif cfg.eval_at_start:
        metrics = validation.run(model, tokenizer, products, image_cfg)
        history.append({"step": 0, "epoch": 0, **metrics})
        logger.info("untrained: %s", _fmt(metrics))

    def save(finished: bool = False) -> None:
        save_checkpoint(model, tokenizer, out, train_cfg=asdict(cfg), history=history,
                        catalog_report=report.summary())
        tmp = state_file.with_suffix(".tmp")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "step": step, "history": history, "finished": finished}, tmp)
        tmp.replace(state_file)

    out.mkdir(parents=True, exist_ok=True)
    if not resuming:
        (out / LOG_FILE).unlink(missing_ok=True)
    bar = tqdm(total=total, initial=step, desc="train", unit="step", mininterval=2)
    started = time.time()
    while step < total:
        epoch, position = divmod(step, steps_per_epoch)
        order = np.random.default_rng(cfg.seed * 31 + epoch).permutation(train_idx)
        idx = order[position * cfg.batch_size:(position + 1) * cfg.batch_size]
        batch = make_batch(products, idx, cfg, step, hard_pool)
        losses = compute_loss(model, tokenizer, products, batch, image_cfg, cfg, step)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        model.clamp_logit_scale()
        step += 1
        with open(out / LOG_FILE, "a") as log:
            log.write(json.dumps({"step": step, **{k: round(v.item(), 6) for k, v in losses.items()},
                                  "lr": scheduler.get_last_lr()[0], "temperature": model.temperature}) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{losses['loss'].item():.3f}", temp=f"{model.temperature:.3f}")
        epoch_end = step % steps_per_epoch == 0 or step == total
        if epoch_end:
            metrics = validation.run(model, tokenizer, products, image_cfg)
            history.append({"step": step, "epoch": math.ceil(step / steps_per_epoch),
                            "seconds": round(time.time() - started, 1), **metrics})
            logger.info("step %d: %s", step, _fmt(metrics))
        if epoch_end or step % cfg.save_every == 0:
            save(finished=step == scheduled)
    bar.close()
    if not state_file.is_file():
        save(finished=step == scheduled)
    return out


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg, columns = parse_args(argv)
    out = train(cfg, columns)
    logger.info("checkpoint: %s", out)


if __name__ == "__main__":
    main()
