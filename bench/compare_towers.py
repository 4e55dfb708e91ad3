"""The paper's comparison on our data: text-only vs 3-tower and 4-tower multimodal, each fusion.

    .venv/bin/python bench/compare_towers.py --limit 10000          # what bench/results/towers.md holds
    .venv/bin/python bench/compare_towers.py --limit 0 --epochs 1   # the full catalog (about 25 min a model here)

Trains every model config on the same products (runs/compare/<model>, resumable), evaluates each
on the committed evaluation set (training/eval_sets/fashion.jsonl) with intact product text and
with colour words removed, and writes bench/results/towers.{md,json,png}. "Exclusive" is the
share of the relevant products a model finds in its top 100 that text-only does not find.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.catalog import DEFAULT_CATALOG  # noqa: E402
from training.evaluate import evaluate  # noqa: E402
from training.queries import QuerySet  # noqa: E402
from training.train import TrainCfg, train  # noqa: E402

MODELS = ("text-only", "mm3-concat", "mm3-alpha", "mm3-mlp", "mm4-concat", "mm4-alpha", "mm4-mlp")
RESULTS = Path(__file__).parent / "results"


def exclusive_share(model: dict, baseline: dict) -> float:
    """Of the relevant products `model` ranks in its top 100, the share `baseline` misses."""
    found = missed = 0
    for ranked, base, relevant in zip(model["ranked"], baseline["ranked"], model["relevant"]):
        rel = set(relevant)
        mine = rel.intersection(ranked[:100])
        found += len(mine)
        missed += len(mine - set(base[:100]))
    return missed / found if found else 0.0


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("training").setLevel(logging.INFO)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog to train and search on")
    p.add_argument("--queries", default="training/eval_sets/fashion.jsonl", help="evaluation query set")
    p.add_argument("--limit", type=int, default=10000, help="first N catalog products to train on and search (0 = all)")
    p.add_argument("--epochs", type=int, default=1, help="training epochs per model")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model configs")
    p.add_argument("--runs", default="runs/compare", help="where the checkpoints go")
    args = p.parse_args(argv)
    queries = QuerySet.load(args.queries)
    limit = args.limit or None
    results = {}
    for name in args.models.split(","):
        out = Path(args.runs) / f"{name}-{args.limit or 'all'}-e{args.epochs}"
        train(TrainCfg(model=name, catalog=args.catalog, out=str(out), limit=args.limit, epochs=args.epochs,
                       eval_at_start=False))
        for degrade in (None, "colour"):
            key = f"{name}{' (no colour words)' if degrade else ''}"
            results[key] = evaluate(out, queries, args.catalog, degrade=degrade, corpus_limit=limit)
            logging.getLogger("training").info("%s: %s", key, results[key]["metrics"])
    rows = []
    for key, result in results.items():
        base_key = "text-only" + (" (no colour words)" if "no colour" in key else "")
        text = result["metrics"]["text"]
        exclusive = (exclusive_share(result["rankings"]["text"], results[base_key]["rankings"]["text"])
                     if base_key in results and key != base_key else None)
        image = result["metrics"].get("image", {})
        rows.append({"model": key, **{k: text[k] for k in ("recall@10", "recall@100", "ndcg@10", "mrr@10")},
                     "exclusive@100": exclusive, "image_recall@10": image.get("recall@10"),
                     "queries": text["queries"], "products": result["products"]})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "towers.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    header = "| model | Recall@10 | Recall@100 | nDCG@10 | MRR@10 | exclusive@100 vs text-only | image→product R@10 |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['model']} | {fmt(r['recall@10'])} | {fmt(r['recall@100'])} | {fmt(r['ndcg@10'])} | "
                     f"{fmt(r['mrr@10'])} | {fmt(r['exclusive@100'])} | {fmt(r['image_recall@10'])} |")
    command = "python bench/compare_towers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (RESULTS / "towers.md").write_text(
        f"# Tower comparison\n\n`{command.strip()}`: {rows[0]['products']} products, "
        f"{rows[0]['queries']} text queries of training/eval_sets/fashion.jsonl, {args.epochs} epoch(s).\n"
        "Recall is capped at min(k, |relevant|). \"no colour words\": colour names removed from every "
        "product's title and description before embedding.\n\n" + "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4))
        names = [r["model"] for r in rows]
        ax.barh(names, [r["recall@100"] for r in rows], color=["#888" if "text-only" in n else "#3a7" for n in names])
        ax.set_xlabel("Recall@100 (capped)")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(RESULTS / "towers.png", dpi=120)
    except ImportError:
        logging.warning("matplotlib is not installed: no plot (pip install matplotlib)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
