"""Train the towers with symmetric InfoNCE on queries generated from the catalog.

    python -m training.train --model mm3-concat --catalog ../shared/data/fashion/catalog.parquet --out runs/mm3

All defaults live in TrainCfg below; `--config run.json` overrides them, and flags override both.
A run resumes exactly where it stopped (same next batch, same next loss) when --out already holds
its training state, trained with the same configuration (run_identity: the catalog's content, the
model config, the recipe); a run of another configuration there is refused, never mixed in. Every
checkpoint is a complete export-ready directory (see training.factory), replaced whole at each save
(training.rundir): a kill leaves the previous checkpoint or the new one, never half of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from core.catalog import DEFAULT_CATALOG, ColumnMap, read_catalog
from core.metrics import rank, retrieval_metrics, without_query_products
from core.queries import Query, generate_queries, generate_query, look, relevant_ids

from . import rundir
from .calibrate import calibrate
from .data import ProductSet, build_product_set, catalog_fingerprint, group_indices, photo_queries, split_indices
from .encode import (
    embed_image_queries,
    embed_products,
    embed_queries,
    model_device,
    pixel_tensor,
    resolve_device,
    tokenize,
)
from .factory import (
    create_model,
    create_tokenizer,
    get_model_config,
    list_models,
    load_checkpoint_config,
    preprocess_config,
    save_checkpoint,
)
from .model import ProductSearchModel

logger = logging.getLogger("training")

STATE_FILE = "training_state.pt"
LOG_FILE = "train_log.jsonl"  # one line of losses per step
LOG_EVERY = 25  # steps between progress lines when stderr is not a terminal


def _f(default, help: str, shapes: bool = True):
    """A TrainCfg field. `shapes=False` marks the few that change neither a weight nor a recorded metric:
    where and how fast the run goes, where it writes, how often it saves or validates, when it stops
    (max_steps keeps the schedule). A run resumes under new values of those; any other change refuses
    to resume (see run_identity). `epochs` shapes: it sets the length of the cosine schedule, so a
    1-epoch run continued to 3 is no 3-epoch run (stop early and continue with max_steps instead)."""
    return field(default=default, metadata={"help": help, "shapes": shapes})


@dataclass
class TrainCfg:
    model: str = _f("mm3-concat", "model config name (training/model_configs/), .json file, or checkpoint dir")
    # The catalog's content shapes the run (run_identity), not the path it is read from.
    catalog: str = _f(DEFAULT_CATALOG, "catalog file: .parquet, .csv or .jsonl", shapes=False)
    out: str = _f("runs/mm3-concat", "output checkpoint directory; holding the training state of a run with "
                  "the same catalog content, model config and recipe, the run resumes (or is already done); "
                  "of another, it is refused", shapes=False)
    limit: int = _f(0, "use only the first N catalog rows (0 = all)")
    val_fraction: float = _f(0.05, "share of products held out for validation (split by id hash)")
    val_queries: int = _f(1000, "number of generated validation queries (disjoint products)")
    epochs: int = _f(1, "passes over the training products")
    max_steps: int = _f(0, "stop after this many steps in total, keeping the schedule (0 = no limit); a later "
                        "run with a larger value continues", shapes=False)
    batch_size: int = _f(128, "products (and queries) per step: the in-batch negatives")
    lr: float = _f(1e-3, "learning rate of the parts trained from scratch (projections, fusion, ViT)")
    lr_pretrained: float = _f(5e-5, "learning rate of pretrained encoders (BERT, a pretrained CLIP)")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases, norms, scalars)")
    warmup_steps: int = _f(50, "linear warm-up steps before cosine decay")
    grad_clip: float = _f(1.0, "max gradient norm (0 = no clipping)")
    text_dropout: float = _f(0.1, "probability of hiding a product's text in training (modality dropout)")
    image_dropout: float = _f(0.1, "probability of hiding a product's image in training (modality dropout)")
    image_query_weight: float = _f(0.5, "weight of the photo-search term: a product photo as the query, the other "
                                   "in-batch products of the same article type and colour as its positives "
                                   "(its own product excluded, so memorising pixels cannot pay)")
    photo_text_weight: float = _f(1.0, "weight of the photo <-> own product text InfoNCE (CLIP's objective: the "
                                  "image part learns what titles name)")
    attribute_weight: float = _f(0.5, "weight of the auxiliary classifiers on the image part (article type, "
                                 "colour; training only, not exported)")
    augment: bool = _f(True, "random crops and horizontal flips of product photos in training (never hue: "
                       "colour is what shoppers search for)")
    crop_scale: float = _f(0.6, "smallest share of the photo's area a random crop keeps")
    hard_negatives: bool = _f(False, "add one hard negative per product: same article type, other colour")
    look_pairs: bool = _f(False, "batches of look pairs: half the batch walks the shuffled catalog, and each of "
                          "those products brings another training product of its look (article type and colour), "
                          "so that a rare look has a positive in its batch too; steps per epoch are unchanged")
    attribute_scale: bool = _f(False, "feed the attribute heads the image part at unit variance (its coordinates "
                               "times sqrt(part_dim)): on the unit-length part, their logits stay too small to "
                               "separate labels (README: the long tail)")
    attribute_logit_adjust: float = _f(0.0, "logit adjustment of the attribute losses (Menon et al., 2021): tau * "
                                       "log(label prior) added to the logits in training, so the heads learn "
                                       "label scores that do not favour frequent labels (0 = plain cross-entropy)")
    seed: int = _f(0, "seed for the split, query generation, batching and dropout")
    save_every: int = _f(200, "save a resumable checkpoint every N steps (and at each epoch end)", shapes=False)
    val_every: int = _f(0, "also validate every N steps: a learning curve in config.json's history (0 = only at "
                        "epoch ends)", shapes=False)
    eval_at_start: bool = _f(True, "validate the untrained model first (step 0 of the history in config.json)",
                             shapes=False)
    threads: int = _f(0, "torch intra-op threads (0 = torch default)", shapes=False)
    device: str = _f("auto", "where to train: auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda, "
                     "cuda:N; a checkpoint from either serves and resumes on either", shapes=False)
    cache_dir: str = _f("cache", "where decoded catalog images are cached between runs", shapes=False)


def field_parser(f: dataclasses.Field):
    """How a TrainCfg field's value is read from text (its flag, or bench/compare_towers.py's --set)."""
    if f.type == "bool":
        return lambda text: text.lower() in ("1", "true", "yes")
    return {"int": int, "float": float}.get(f.type, str)


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
            parser.add_argument(flag, type=field_parser(f), default=None,
                                help=f.metadata["help"] + f" (default: {f.default})")
    ColumnMap.add_arguments(parser)
    free = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(TrainCfg) if not f.metadata["shapes"]]
    parser.epilog = (f"A run resumes only with the model config, the catalog content (as read: --limit and the "
                     f"column flags applied) and the flags it began with, but for {', '.join(free)} (--catalog "
                     f"to the same content elsewhere). models: {', '.join(list_models())}")
    args = parser.parse_args(argv)
    values = {}
    if args.config:
        values = json.loads(Path(args.config).read_text())
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainCfg)
                   if getattr(args, f.name) is not None})
    return TrainCfg(**values), ColumnMap.from_args(args)


# -- what shaped a run -------------------------------------------------------------------------

class OtherRunError(ValueError):
    """--out holds a run trained with another configuration."""


def run_identity(cfg: TrainCfg, catalog) -> dict:
    """What a run's weights and recorded metrics depend on, saved with every checkpoint and compared on resume.

    The recipe (every TrainCfg field but the few marked shapes=False), the model config as the run started
    (calibration later changes one field of the checkpoint's), and the catalog as read (`catalog`, the frame
    from read_catalog: --limit and the column mapping included) by content, not by path.
    """
    identity = {
        "recipe": {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainCfg) if f.metadata["shapes"]},
        "model_cfg": get_model_config(cfg.model).to_dict(),
        "catalog": {"path": catalog.attrs["path"], "products": len(catalog), "sha256": catalog_fingerprint(catalog)},
    }
    return json.loads(json.dumps(identity))  # as config.json holds it (lists, not tuples)


def recorded_identity(out: Path, state: dict) -> dict:
    if "identity" in state:
        return state["identity"]
    # Saved before runs recorded their identity: the recipe from config.json, the catalog by path.
    train_cfg = load_checkpoint_config(out).get("train_cfg", {})
    shaping = {f.name for f in dataclasses.fields(TrainCfg) if f.metadata["shapes"]}
    return {"recipe": {k: v for k, v in train_cfg.items() if k in shaping},
            "catalog": {"path": str(Path(train_cfg.get("catalog", "")).resolve())}}


def identity_changes(recorded: dict, current: dict) -> list[str]:
    """What differs between the configuration a run was trained with and this one; [] lets it resume.

    A TrainCfg field the recorded run predates is taken as unchanged (its default keeps the old behaviour).
    """
    old_recipe, new_recipe = recorded["recipe"], current["recipe"]
    changes = [f"{k} {v!r} -> {new_recipe[k]!r}" for k, v in old_recipe.items()
               if k in new_recipe and v != new_recipe[k]]
    old_model = recorded.get("model_cfg", current["model_cfg"])
    if old_model != current["model_cfg"]:
        keys = sorted(k for k in {*old_model, *current["model_cfg"]} if old_model.get(k) != current["model_cfg"].get(k))
        changes.append(f"model config ({', '.join(keys)})")
    old, new = recorded["catalog"], current["catalog"]
    same = old["sha256"] == new["sha256"] if "sha256" in old else old["path"] == new["path"]
    if not same:
        changes.append(f"catalog {_catalog_text(old)} -> {_catalog_text(new)}")
    return changes


def _catalog_text(catalog: dict) -> str:
    if "sha256" not in catalog:
        return catalog["path"]
    return f"{catalog['path']} ({catalog['products']} products, sha256 {catalog['sha256'][:12]})"


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


def multi_positive_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
                       positives: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """InfoNCE with several positives per row (SupCon's L_out): every positive is pulled up.

    `positives` and `excluded` are (len(a), len(b)) masks; excluded entries leave the softmax.
    Rows without a positive do not count.
    """
    logits = (logit_scale.exp() * a @ b.T).masked_fill(excluded, float("-inf"))
    log_p = logits.log_softmax(dim=-1).masked_fill(~positives, 0.0)
    rows = positives.any(dim=1)
    if not rows.any():
        return a.sum() * 0.0
    return -(log_p.sum(1)[rows] / positives.sum(1)[rows]).mean()


def augment_pixels(pixels: torch.Tensor, gen: torch.Generator, min_scale: float) -> torch.Tensor:
    """Random resized crops and horizontal flips of normalized pixels (B, 3, S, S), in one resample.

    Geometry only: colour is what shoppers search for, so hue and saturation are never touched.
    """
    n = pixels.shape[0]
    # The random draws come from a CPU generator on any device: the same crops on a GPU and a CPU.
    side = torch.empty(n).uniform_(min_scale, 1.0, generator=gen).sqrt()  # crop side / image side
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (1 - side).unsqueeze(1)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side * flip, side
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(pixels.device), list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)


class AttributeHeads(nn.Module):
    """Linear classifiers on the image part, one per catalog attribute (training only).

    Every catalog has a category column: naming it from the photo is a dense, cheap signal that
    a from-scratch image tower learns from faster than from in-batch contrast alone.
    The image part is unit-length; with `scale`, its coordinates are multiplied by sqrt(part_dim) (unit
    variance) before the heads, without it their logits stay too small for the softmax to separate labels.
    With `logit_adjust` tau > 0, the loss sees logits + tau * log(prior) (the label shares among
    the training products), so that the heads' own logits rank labels as if they were balanced.
    """

    ATTRIBUTES = ("article_type", "base_colour")

    def __init__(self, products: ProductSet, indices: np.ndarray, part_dim: int, logit_adjust: float = 0.0,
                 scale: bool = False):
        super().__init__()
        self.vocab = {a: sorted({products.attrs[i][a].lower() for i in indices} - {""}) for a in self.ATTRIBUTES}
        self.heads = nn.ModuleDict({a: nn.Linear(part_dim, len(v)) for a, v in self.vocab.items()})
        self.labels = {a: torch.tensor([self._label(a, attrs[a]) for attrs in products.attrs])
                       for a in self.ATTRIBUTES}
        self.scale = math.sqrt(part_dim) if scale else 1.0
        self.adjust = {}
        for a, labels in self.labels.items():
            known = labels[torch.from_numpy(indices)]
            counts = torch.bincount(known[known >= 0], minlength=len(self.vocab[a])).float()
            self.adjust[a] = logit_adjust * (counts / counts.sum()).clamp(min=1e-8).log()

    def _label(self, attribute: str, value: str) -> int:
        values = self.vocab[attribute]
        value = value.lower()
        position = np.searchsorted(values, value)
        return int(position) if position < len(values) and values[position] == value else -100

    def forward(self, image: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        rows = torch.from_numpy(idx)
        scaled = image * self.scale
        return sum(F.cross_entropy(head(scaled) + self.adjust[a].to(image.device),
                                   self.labels[a][rows].to(image.device), ignore_index=-100)
                   for a, head in self.heads.items()) / len(self.heads)


# -- one step ---------------------------------------------------------------------------------

@dataclass
class Batch:
    queries: list[Query]
    products: np.ndarray  # indices into the ProductSet: positives first, then hard negatives


def look_partners(anchors: np.ndarray, pools: dict[tuple[str, str], list[int]], products: ProductSet,
                  fallback: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One partner per anchor: another product of its look from `pools` (look -> training products), or, for a
    look with no other training product, a product drawn from `fallback`."""
    partners = np.empty_like(anchors)
    for k, i in enumerate(anchors):
        pool = pools[look(products.attrs[i])]
        if len(pool) > 1:
            j = pool[rng.integers(len(pool) - 1)]
            partners[k] = pool[-1] if j == i else j  # uniform over the pool without i
        else:
            partners[k] = fallback[rng.integers(len(fallback))]
    return partners


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
                 image_cfg: dict | None, cfg: TrainCfg, step: int,
                 heads: AttributeHeads | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
    torch.manual_seed(cfg.seed * 104_729 + step)  # dropout inside the towers: exact on resume
    n, idx, device = len(batch.queries), batch.products, model_device(model)
    q_batch = tokenize(tokenizer, [q.text for q in batch.queries], model.cfg.text_cfg.query_max_length, device)
    queries = model.encode_query(**q_batch)
    p_batch = tokenize(tokenizer, [products.texts[i] for i in idx], model.cfg.text_cfg.max_length, device)
    text = model.encode_product_text(**p_batch)
    losses = {}
    fn = torch.tensor([[j != i and q.matches(products.attrs[idx[j]]) for j in range(len(idx))]
                       for i, q in enumerate(batch.queries)], device=device)
    if not model.cfg.multimodal:
        losses["query"] = info_nce(queries, text, model.logit_scale, fn)
        losses["loss"] = losses["query"]
        return losses
    pixels = pixel_tensor(products.pixels[idx], image_cfg, device)
    if cfg.augment:
        pixels = augment_pixels(pixels, gen, cfg.crop_scale)
    image = model.encode_image(pixels)
    has_image = torch.from_numpy(products.has_image[idx].astype(np.float32))
    # Modality dropout: hide one modality (never both) so that partial products still embed.
    u = torch.rand(len(idx), generator=gen)
    text_mask = (u >= cfg.text_dropout).float()
    image_mask = has_image * (u < 1 - cfg.image_dropout).float()
    text_mask = torch.maximum(text_mask, 1 - image_mask)
    product = model.fuse(text, image, text_mask.to(device), image_mask.to(device))
    losses["query"] = info_nce(queries, product, model.logit_scale, fn)
    rows = torch.nonzero(has_image[:n]).squeeze(1)  # on the CPU: it also indexes numpy arrays
    if len(rows):
        on = rows.to(device)
        looks = [look(products.attrs[i]) for i in idx]
        same_look = torch.tensor([[looks[r] == looks[j] for j in range(len(idx))] for r in rows.tolist()],
                                 device=device)
        own = torch.zeros_like(same_look)
        own[torch.arange(len(rows), device=device), on] = True
        if cfg.photo_text_weight > 0:
            # Other products of the same look are not negatives of a photo's text (as for queries).
            losses["photo_text"] = info_nce(image[on], text[on], model.logit_scale,
                                            same_look[:, on] & ~own[:, on])
        if cfg.image_query_weight > 0:
            losses["image"] = multi_positive_nce(model.encode_image_query(image[on]), product,
                                                 model.logit_scale, same_look & ~own, own)
        if heads is not None and cfg.attribute_weight > 0:
            losses["attributes"] = heads(image[on], idx[rows.numpy()])
    weights = {"query": 1.0, "photo_text": cfg.photo_text_weight, "image": cfg.image_query_weight,
               "attributes": cfg.attribute_weight}
    losses["loss"] = sum(weights[k] * v for k, v in losses.items())
    return losses


# -- validation -------------------------------------------------------------------------------

@dataclass
class Validation:
    indices: np.ndarray
    queries: list[Query]
    relevant: list[list[str]]
    photos: np.ndarray  # held-out products with a photo: the image queries
    photo_relevant: list[list[str]]  # the other held-out products of the same look

    @classmethod
    def build(cls, products: ProductSet, indices: np.ndarray, cfg: TrainCfg) -> Validation:
        rows = [{"product_id": products.ids[i], **products.attrs[i]} for i in indices]
        queries = generate_queries(rows, seed=cfg.seed + 1)
        rng = random.Random(cfg.seed + 2)
        if len(queries) > cfg.val_queries:
            queries = rng.sample(queries, cfg.val_queries)
        attrs = [products.attrs[i] for i in indices]
        ids = [products.ids[i] for i in indices]
        return cls(indices, queries, [relevant_ids(q, attrs, ids) for q in queries], *photo_queries(products, indices))

    def run(self, model: ProductSearchModel, tokenizer, products: ProductSet, image_cfg: dict | None) -> dict:
        ids = [products.ids[i] for i in self.indices]
        product_emb = embed_products(model, tokenizer, products, image_cfg, self.indices)
        query_emb = embed_queries(model, tokenizer, [q.text for q in self.queries])
        metrics = retrieval_metrics(rank(query_emb, product_emb, ids), self.relevant)
        if model.cfg.multimodal and len(self.photos):
            # Photo search, measured so that it can fail: the photo's own product does not count.
            image_emb = embed_image_queries(model, products.pixels[self.photos], image_cfg)
            photo_ids = [products.ids[i] for i in self.photos]
            ranked, relevant = without_query_products(rank(image_emb, product_emb, ids, k=101),
                                                      self.photo_relevant, photo_ids)
            if ranked:
                metrics.update({f"image_{k}": v for k, v in retrieval_metrics(ranked, relevant).items()})
        model.train()
        return metrics


# -- the loop ---------------------------------------------------------------------------------

def build_optimizer(model: ProductSearchModel, cfg: TrainCfg, heads: nn.Module | None = None) -> torch.optim.Optimizer:
    pretrained_prefixes = ["query_bert.", "product_bert."]
    if model.cfg.multimodal and model.cfg.vision_cfg.pretrained:
        pretrained_prefixes += ["image_encoder.", "clip_text."]
    groups = {(p, d): [] for p in (True, False) for d in (True, False)}
    named = list(model.named_parameters()) + (list(heads.named_parameters("heads.")) if heads is not None else [])
    for name, param in named:
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
    rundir.recover(out)  # a save a kill interrupted: finished or undone
    state_file = out / STATE_FILE
    resuming = state_file.is_file()
    state = torch.load(state_file, weights_only=False, map_location="cpu") if resuming else None
    df, report = read_catalog(cfg.catalog, columns, limit=cfg.limit or None)
    identity = run_identity(cfg, df)
    if resuming:
        changes = identity_changes(recorded_identity(out, state), identity)
        if changes:
            raise OtherRunError(f"{out} holds a run trained with another configuration ({'; '.join(changes)}): "
                                f"pass another --out, or delete {out} to train this one there")
        if state.get("finished"):
            logger.info("%s is already trained (delete it, or pick another --out, to train again)", out)
            return out
    source = str(out) if resuming else cfg.model
    model_cfg = get_model_config(source)
    image_cfg = preprocess_config(model_cfg)["image"]

    products = build_product_set(df, image_cfg, report, cfg.cache_dir)
    report.log()
    train_idx, val_idx = split_indices(products.ids, cfg.val_fraction, cfg.seed)
    validation = Validation.build(products, val_idx, cfg)
    logger.info("%d training products, %d validation products, %d validation queries",
                len(train_idx), len(val_idx), len(validation.queries))
    hard_pool = group_indices(products, train_idx, lambda a: a["article_type"]) if cfg.hard_negatives else None
    look_pools = group_indices(products, train_idx, look) if cfg.look_pairs else None

    torch.manual_seed(cfg.seed)  # the random init of the new parts
    device = resolve_device(cfg.device)
    model = create_model(source).to(device)
    tokenizer = create_tokenizer(source)
    model.train()
    heads = None
    if model.cfg.multimodal and cfg.attribute_weight > 0:
        heads = AttributeHeads(products, train_idx, model.cfg.part_dim, cfg.attribute_logit_adjust,
                               cfg.attribute_scale).to(device)
    logger.info("training on %s", torch.cuda.get_device_name(device) if device.type == "cuda" else device)
    optimizer = build_optimizer(model, cfg, heads)
    steps_per_epoch = len(train_idx) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_idx)} training products cannot fill one batch of {cfg.batch_size}")
    scheduled = steps_per_epoch * cfg.epochs
    # max_steps stops the run early without reshaping the LR schedule, like an interruption.
    total = min(scheduled, cfg.max_steps) if cfg.max_steps else scheduled
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(scheduled, cfg.warmup_steps))
    step, train_seconds = 0, 0.0  # train_seconds: time in training steps, validation excluded
    history: list[dict] = []
    if resuming:
        optimizer.load_state_dict(state["optimizer"])  # moves its state to the parameters' device
        if heads is not None:
            heads.load_state_dict(state["heads"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = state["step"], state["history"]
        train_seconds = state.get("train_seconds", 0.0)
        logger.info("resuming %s at step %d of %d", out, step, total)
    elif cfg.eval_at_start:
        metrics = validation.run(model, tokenizer, products, image_cfg)
        history.append({"step": 0, "epoch": 0, **metrics})
        logger.info("untrained: %s", _fmt(metrics))

    calibration: dict = {}

    def save(finished: bool = False) -> None:
        # The whole generation (weights, config, tokenizer, training state) is written beside `out` and
        # swapped in at once: a kill anywhere leaves the previous one or this one, never weights ahead of
        # their training state.
        staged = rundir.stage(out)
        save_checkpoint(model, tokenizer, staged, train_cfg=asdict(cfg), run_identity=identity, history=history,
                        catalog_report=report.summary(),
                        **({"image_query_calibration": calibration} if calibration else {}))
        rundir.save_hook("weights")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "heads": heads.state_dict() if heads is not None else None, "identity": identity,
                    "step": step, "history": history, "finished": finished, "train_seconds": train_seconds},
                   staged / STATE_FILE)
        rundir.publish(staged, out)

    out.mkdir(parents=True, exist_ok=True)
    log_file = out / LOG_FILE
    if not resuming:
        log_file.unlink(missing_ok=True)
    elif log_file.is_file():  # a killed run logged steps past its last save: they are redone now
        kept = [line for line in log_file.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line)["step"] <= step]
        log_file.write_text("".join(kept))
    # A bar on a terminal; piped into a log, one line every LOG_EVERY steps instead.
    bar = tqdm(total=total, initial=step, desc="train", unit="step", mininterval=2, disable=None)
    started, first_step = time.time(), step
    while step < total:
        epoch, position = divmod(step, steps_per_epoch)
        order = np.random.default_rng(cfg.seed * 31 + epoch).permutation(train_idx)
        if look_pools is None:
            idx = order[position * cfg.batch_size:(position + 1) * cfg.batch_size]
        else:
            half = cfg.batch_size // 2
            anchors = order[position * half:(position + 1) * half]
            rng = np.random.default_rng([cfg.seed, 37, step])
            idx = np.concatenate([anchors, look_partners(anchors, look_pools, products, order, rng)])
        tick = time.perf_counter()
        batch = make_batch(products, idx, cfg, step, hard_pool)
        losses = compute_loss(model, tokenizer, products, batch, image_cfg, cfg, step, heads)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if cfg.grad_clip:
            params = [*model.parameters(), *(heads.parameters() if heads is not None else [])]
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        model.clamp_logit_scale()
        step += 1
        train_seconds += time.perf_counter() - tick
        with open(log_file, "a") as log:
            log.write(json.dumps({"step": step, **{k: round(v.item(), 6) for k, v in losses.items()},
                                  "lr": scheduler.get_last_lr()[0], "temperature": model.temperature}) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{losses['loss'].item():.3f}", temp=f"{model.temperature:.3f}")
        if bar.disable and step % LOG_EVERY == 0:
            rate = (time.time() - started) / max(1, step - first_step)
            logger.info("step %d/%d: loss %.3f, %.1f s/step, %.0f min left", step, total,
                        losses["loss"].item(), rate, rate * (total - step) / 60)
        epoch_end = step % steps_per_epoch == 0 or step == total
        if epoch_end or (cfg.val_every and step % cfg.val_every == 0):
            metrics = validation.run(model, tokenizer, products, image_cfg)
            history.append({"step": step, "epoch": math.ceil(step / steps_per_epoch),
                            "seconds": round(time.time() - started, 1), "train_seconds": round(train_seconds, 1),
                            **metrics})
            logger.info("step %d: %s", step, _fmt(metrics))
        if epoch_end or step % cfg.save_every == 0:
            save(finished=step == scheduled)
    bar.close()
    if step == scheduled and model.cfg.multimodal and model.cfg.image_query == "image":
        # How a photo becomes a query: chosen on held-out products no evaluation set asks with; no weight
        # depends on it.
        calibration.update(calibrate(model, tokenizer, products, val_idx, image_cfg))
        model.cfg.image_query_text_weight = calibration["chosen"]
        logger.info("image query text weight %.2f (own@1 / nDCG@10 per weight: %s)", calibration["chosen"],
                    ", ".join(f"{r['weight']}: {r['own@1']:.3f} / {r['ndcg@10']:.3f}" for r in calibration["rows"]))
        save(finished=True)
    if not state_file.is_file():
        save(finished=step == scheduled)
    return out


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg, columns = parse_args(argv)
    try:
        out = train(cfg, columns)
    except OtherRunError as exc:
        sys.exit(f"error: {exc}")
    logger.info("checkpoint: %s", out)


if __name__ == "__main__":
    main()
