"""The supervised probe: a ResNet-18 trained from scratch to name a photo's article type and colour, as the
baseline that photo search must beat.

    python bench/probe.py                       # CPU: trains for --minutes, then scores
    python bench/probe.py --epochs 30 --device cuda --image-size 96

It trains on every catalog product with a photo except those an evaluation set asks with (the photos it is
scored on: core.queries.evaluation_query_products), on the photos as the model config's preprocessing decodes
them (mm3-concat: 64 px), with the same crops and flips as training/train.py. A photo query then ranks the whole
catalog by log p(type) + log p(colour) of each product's catalog labels (ties in catalog order; a label the probe
never saw ranks last). Scored as photo queries are everywhere else (the photo's own product left out): micro and
macro nDCG@10 and R@100, and nDCG@10 by the look's size. Writes bench/results/probe.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.catalog import DEFAULT_CATALOG, read_catalog  # noqa: E402
from core.metrics import RELEVANT_BUCKETS, finds_others, grouped_metrics, retrieval_metrics, without_query_products  # noqa: E402
from core.queries import BALANCED_EVAL_SET, DEFAULT_EVAL_SET, QuerySet, evaluation_query_products  # noqa: E402
from training.data import build_product_set  # noqa: E402
from training.encode import pixel_tensor, resolve_device  # noqa: E402
from training.factory import get_model_config, preprocess_config  # noqa: E402
from training.train import augment_pixels  # noqa: E402

logger = logging.getLogger("bench.probe")
ATTRIBUTES = ("article_type", "base_colour")
RESULTS = Path(__file__).resolve().parent / "results"


def labels_of(products, attribute: str, vocab: list[str]) -> np.ndarray:
    index = {v: i for i, v in enumerate(vocab)}
    return np.array([index.get(a[attribute].lower(), -1) for a in products.attrs])


def build_probe(classes: dict[str, int]) -> torch.nn.Module:
    """torchvision's ResNet-18 as it is, its classifier the attributes' logits side by side. (A stride-1 stem for
    small photos costs 16x the compute: out of a CPU budget.)"""
    return torchvision.models.resnet18(num_classes=sum(classes.values()))


def train_probe(pixels: np.ndarray, labels: dict[str, np.ndarray], train_idx: np.ndarray, image_cfg: dict,
                args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, dict]:
    classes = {a: int(labels[a].max()) + 1 for a in ATTRIBUTES}
    torch.manual_seed(args.seed)
    net = build_probe(classes).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=5e-4)
    rng = np.random.default_rng(args.seed)
    steps_per_epoch = len(train_idx) // args.batch_size
    planned = steps_per_epoch * args.epochs if args.epochs else None
    budget = args.minutes * 60
    started, step = time.time(), 0
    bar = tqdm(desc="probe", unit="step", total=planned, mininterval=2, disable=None)
    gen = torch.Generator().manual_seed(args.seed)
    split = np.cumsum([classes[a] for a in ATTRIBUTES])[:-1]
    while True:
        # The schedule: cosine over the planned steps, or over the time budget when training by the clock.
        progress = step / planned if planned else (time.time() - started) / budget
        if progress >= 1:
            break
        epoch, b = divmod(step, steps_per_epoch)
        if b == 0:
            order = rng.permutation(train_idx)
        for group in opt.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * progress))
        idx = order[b * args.batch_size:(b + 1) * args.batch_size]
        x = augment_pixels(pixel_tensor(pixels[idx], image_cfg, device), gen, 0.6)
        logits = torch.tensor_split(net(x), split.tolist(), dim=1)
        loss = sum(F.cross_entropy(z, torch.from_numpy(labels[a][idx]).to(device), ignore_index=-1)
                   for a, z in zip(ATTRIBUTES, logits)) / len(ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch)
    bar.close()
    minutes = round((time.time() - started) / 60, 1)
    return net, {"steps": step, "epochs": round(step / steps_per_epoch, 2), "minutes": minutes, "classes": classes}


@torch.no_grad()
def label_log_probs(net: torch.nn.Module, pixels: np.ndarray, image_cfg: dict, classes: dict[str, int],
                    device: torch.device) -> dict[str, np.ndarray]:
    net.eval()
    split = np.cumsum([classes[a] for a in ATTRIBUTES])[:-1].tolist()
    out = {a: [] for a in ATTRIBUTES}
    for s in range(0, len(pixels), 256):
        logits = torch.tensor_split(net(pixel_tensor(pixels[s:s + 256], image_cfg, device)), split, dim=1)
        for a, z in zip(ATTRIBUTES, logits):
            out[a].append(F.log_softmax(z, dim=1).cpu().numpy())
    return {a: np.concatenate(v) for a, v in out.items()}


def score_set(path: Path, products, labels: dict[str, np.ndarray], net, image_cfg, classes, device) -> dict:
    queries = QuerySet.load(path)
    position = {pid: i for i, pid in enumerate(products.ids)}
    rows = [(position[q], rel, g) for q, rel, g in zip(queries.image_ids, queries.image_relevant, queries.image_groups)
            if q in position and products.has_image[position[q]] and finds_others(q, rel)]
    idx = np.array([i for i, _, _ in rows])
    log_p = label_log_probs(net, products.pixels[idx], image_cfg, classes, device)
    ids = np.array(products.ids)
    # (queries, products): each product's labels' log-probability for each photo; an unseen label ranks last.
    score = sum(np.where(labels[a] >= 0, log_p[a][:, np.maximum(labels[a], 0)], -1e4) for a in ATTRIBUTES)
    ranked = ids[np.argsort(-score, axis=1, kind="stable")[:, :101]].tolist()
    query_ids = [products.ids[i] for i in idx]
    ranked, relevant = without_query_products(ranked, [r for _, r, _ in rows], query_ids, 100)
    accuracy = {a: float(np.mean(log_p[a].argmax(1) == labels[a][idx])) for a in ATTRIBUTES}
    return {"queries": len(idx), "micro": retrieval_metrics(ranked, relevant),
            "groups": grouped_metrics(ranked, relevant, [g for _, _, g in rows]), "accuracy": accuracy}


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    run = result["run"]
    lines = ["# Supervised probe: photo search by predicted article type and colour", "",
             f"`python bench/probe.py {result['command']}`: ResNet-18 from scratch, {run['image_size']} px, "
             f"{run['minutes']} min of training ({run['epochs']} epochs, {run['steps']} steps) on {run['device']}, "
             f"{run['train_products']} training products (every product with a photo but the ones evaluation sets "
             "ask with). A photo ranks the catalog by log p(type) + log p(colour) of each product's labels; "
             "its own product is left out.", "",
             "| set | photos | type acc | colour acc | nDCG@10 micro | nDCG@10 macro | R@100 macro | "
             + " | ".join(label for _, _, label in RELEVANT_BUCKETS) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(RELEVANT_BUCKETS)]
    for name, r in result["sets"].items():
        macro, buckets = r["groups"]["macro"], r["groups"]["by_relevant"]
        cells = [f"{buckets[label]['ndcg@10']:.3f}" if label in buckets else "-" for _, _, label in RELEVANT_BUCKETS]
        lines.append(f"| {name} | {r['queries']} | {r['accuracy']['article_type']:.3f} | "
                     f"{r['accuracy']['base_colour']:.3f} | {r['micro']['ndcg@10']:.3f} | {macro['ndcg@10']:.3f} | "
                     f"{macro['recall@100']:.3f} | " + " | ".join(cells) + " |")
    (out / "probe.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog: photos, labels and the searched products")
    p.add_argument("--model", default="mm3-concat", help="model config whose image preprocessing the probe sees")
    p.add_argument("--image-size", type=int, default=0, help="decode photos at this size instead (0 = the config's)")
    p.add_argument("--minutes", type=float, default=25, help="training time budget (ignored with --epochs)")
    p.add_argument("--epochs", type=int, default=0, help="train this many epochs instead of by the clock")
    p.add_argument("--batch-size", type=int, default=128, help="photos per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (cosine decay)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seeds the init, the batches and the crops")
    p.add_argument("--cache-dir", default="cache", help="where decoded catalog images are cached")
    p.add_argument("--out", default=str(RESULTS), help="folder for probe.md and probe.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    image_cfg = dict(preprocess_config(get_model_config(args.model))["image"])
    if args.image_size:
        image_cfg["image_size"] = args.image_size
    df, report = read_catalog(args.catalog)
    products = build_product_set(df, image_cfg, report, args.cache_dir)
    train_vocab = {a: sorted({x[a].lower() for x in products.attrs} - {""}) for a in ATTRIBUTES}
    labels = {a: labels_of(products, a, v) for a, v in train_vocab.items()}
    asked = evaluation_query_products()
    train_idx = np.array([i for i, pid in enumerate(products.ids) if products.has_image[i] and pid not in asked])
    net, run = train_probe(products.pixels, labels, train_idx, image_cfg, args, device)
    run.update(image_size=image_cfg["image_size"], device=str(device), train_products=len(train_idx))
    sets = {"balanced (fashion-balanced.jsonl)": BALANCED_EVAL_SET, "popular (fashion.jsonl)": DEFAULT_EVAL_SET}
    result = {"command": " ".join(argv if argv is not None else sys.argv[1:]), "run": run,
              "sets": {name: score_set(path, products, labels, net, image_cfg, run["classes"], device)
                       for name, path in sets.items()}}
    write_results(result, Path(args.out))
    print((Path(args.out) / "probe.md").read_text())


if __name__ == "__main__":
    main()
