"""The paper's comparison on our data: text-only vs 3-tower and 4-tower multimodal, each fusion.

    .venv/bin/python bench/compare_towers.py                 # full catalog, 1 epoch each (bench/results/towers.md)
    .venv/bin/python bench/compare_towers.py --limit 10000   # a quicker look on the first 10,000 products

Trains every model config on the same products (runs/compare/<model>, resumable), evaluates each
on the committed evaluation set (training/eval_sets/fashion.jsonl) three ways: text queries on
intact product text, text queries on product text with its colour words removed (what is found
then comes from the photo), and photo queries (a held-out product's photo; relevant = the other
products of its article type and colour, its own product excluded). Writes
bench/results/towers.{md,json,png} after every model, so an interrupted run keeps what it measured.
"Exclusive" is the share of the relevant products a model finds in its top 100 that text-only misses.
The learning curve (validation split, every --val-every steps) comes from each checkpoint's history.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.catalog import DEFAULT_CATALOG  # noqa: E402
from core.queries import QuerySet  # noqa: E402
from training.evaluate import evaluate  # noqa: E402
from training.train import TrainCfg, train  # noqa: E402

MODELS = ("mm3-concat", "text-only", "mm3-mlp", "mm4-concat", "mm3-alpha", "mm4-alpha", "mm4-mlp")
RESULTS = Path(__file__).parent / "results"
logger = logging.getLogger("bench.compare_towers")


def exclusive_share(model: dict, baseline: dict) -> float:
    """Of the relevant products `model` ranks in its top 100, the share `baseline` misses."""
    found = missed = 0
    for ranked, base, relevant in zip(model["ranked"], baseline["ranked"], model["relevant"]):
        rel = set(relevant)
        mine = rel.intersection(ranked[:100])
        found += len(mine)
        missed += len(mine - set(base[:100]))
    return missed / found if found else 0.0


def measure(name: str, args: argparse.Namespace, queries: QuerySet) -> dict:
    out = Path(args.runs) / f"{name}-{args.limit or 'all'}-e{args.epochs}"
    train(TrainCfg(model=name, catalog=args.catalog, out=str(out), limit=args.limit, epochs=args.epochs,
                   val_every=args.val_every, eval_at_start=True))
    config = json.loads((out / "config.json").read_text())
    limit = args.limit or None
    intact = evaluate(out, queries, args.catalog, corpus_limit=limit)
    no_colour = evaluate(out, queries, args.catalog, degrade="colour", corpus_limit=limit)
    history = config["history"]
    return {
        "model": name, "checkpoint": str(out), "products": intact["products"],
        "text": intact["metrics"]["text"], "text_no_colour": no_colour["metrics"]["text"],
        "image": intact["metrics"].get("image"),
        "train_minutes": round(history[-1].get("train_seconds", history[-1]["seconds"]) / 60, 1),
        "curve": [{k: h.get(k) for k in ("step", "train_seconds", "recall@10", "ndcg@10", "image_ndcg@10",
                                         "image_recall@100")} for h in history],
        "rankings": {"text": intact["rankings"]["text"], "text_no_colour": no_colour["rankings"]["text"]},
    }


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["model"] == "text-only"), None)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| model | text nDCG@10 | text R@100 | no-colour nDCG@10 | no-colour R@100 | exclusive@100 "
             "(no colour) | photo nDCG@10 | photo R@10 | photo R@100 | train min |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        image = r["image"] or {}
        exclusive = None
        if base is not None and r is not base:
            exclusive = exclusive_share(r["rankings"]["text_no_colour"], base["rankings"]["text_no_colour"])
        lines.append(f"| {r['model']} | {fmt(r['text']['ndcg@10'])} | {fmt(r['text']['recall@100'])} | "
                     f"{fmt(r['text_no_colour']['ndcg@10'])} | {fmt(r['text_no_colour']['recall@100'])} | "
                     f"{fmt(exclusive)} | {fmt(image.get('ndcg@10'))} | {fmt(image.get('recall@10'))} | "
                     f"{fmt(image.get('recall@100'))} | {r['train_minutes']} |")
    return "\n".join(lines)


def curve_table(rows: list[dict]) -> str:
    lines = ["| model | step | training minutes | text R@10 | photo nDCG@10 | photo R@100 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        for point in r["curve"]:
            minutes = (point.get("train_seconds") or 0) / 60
            photo = [point.get("image_ndcg@10"), point.get("image_recall@100")]
            photo = ["-" if v is None else f"{v:.3f}" for v in photo]
            lines.append(f"| {r['model']} | {point['step']} | {minutes:.1f} | {point['recall@10']:.3f} | "
                         f"{photo[0]} | {photo[1]} |")
    return "\n".join(lines)


def plot(rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["model"] for r in rows]
    y = range(len(rows))
    width = 0.27
    for shift, key, label, colour in ((-width, "text", "text queries", "#888"),
                                      (0, "text_no_colour", "text queries, no colour words", "#3a7"),
                                      (width, "image", "photo queries", "#37a")):
        values = [(r[key] or {}).get("ndcg@10", 0) for r in rows]
        left.barh([i + shift for i in y], values, height=width, label=label, color=colour)
    left.set_yticks(list(y), names)
    left.invert_yaxis()
    left.set_xlabel("nDCG@10 (committed eval set, full catalog)")
    left.legend(loc="lower right", fontsize=8)
    for r in rows:
        points = [p for p in r["curve"] if p.get("image_ndcg@10") is not None]
        if points:
            right.plot([(p.get("train_seconds") or 0) / 60 for p in points], [p["image_ndcg@10"] for p in points],
                       marker="o", label=r["model"])
    right.set_xlabel("training minutes (2 CPU cores)")
    right.set_ylabel("photo nDCG@10 (validation split)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "towers.png", dpi=120)


def write(rows: list[dict], args: argparse.Namespace, command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k != "rankings"} for r in rows]
    (RESULTS / "towers.json").write_text(json.dumps({"command": command, "rows": slim}, indent=2) + "\n")
    first = rows[0]
    (RESULTS / "towers.md").write_text(
        f"# Tower comparison\n\n`{command}`: {first['products']} products, {first['text']['queries']} text "
        f"and {(first['image'] or {}).get('queries', 0)} photo queries of training/eval_sets/fashion.jsonl, "
        f"{args.epochs} epoch(s) each on 2 CPU cores.\n"
        "Recall is capped at min(k, |relevant|). \"no colour\": colour names removed from every product's title "
        "and description before embedding. Photo queries: relevant = the other products of the photo's "
        "article type and colour; the photo's own product is out of the ranking.\n\n"
        + table(rows) + "\n\n## Learning curves (validation split: 5% held-out products)\n\n" + curve_table(rows)
        + "\n\n![nDCG@10 per model and photo-search learning curves](towers.png)\n")
    plot(rows)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("training").setLevel(logging.INFO)
    logger.setLevel(logging.INFO)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog to train and search on")
    p.add_argument("--queries", default="training/eval_sets/fashion.jsonl", help="evaluation query set")
    p.add_argument("--limit", type=int, default=0, help="first N catalog products to train on and search (0 = all)")
    p.add_argument("--epochs", type=int, default=1, help="training epochs per model")
    p.add_argument("--val-every", type=int, default=100, help="validation steps of the learning curve")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model configs, in this order")
    p.add_argument("--runs", default="runs/compare", help="where the checkpoints go")
    args = p.parse_args(argv)
    command = "python bench/compare_towers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    queries = QuerySet.load(args.queries)
    rows = []
    for name in args.models.split(","):
        rows.append(measure(name, args, queries))
        logger.info("%s: %s", name, {k: rows[-1][k] for k in ("text", "text_no_colour", "image")})
        write(rows, args, command.strip())
    print(table(rows))


if __name__ == "__main__":
    main()
