"""The paper's comparison on our data: text-only vs 3-tower and 4-tower multimodal, each fusion.

    .venv/bin/python bench/compare_towers.py                 # full catalog, 1 epoch each (bench/results/towers.md)
    .venv/bin/python bench/compare_towers.py --limit 10000   # a quicker look on the first 10,000 products
    python bench/compare_towers.py --models mm3-concat --set lr=2e-3 --device cuda --results /tmp/lr
    python bench/compare_towers.py --merge /tmp/lr.json /tmp/base.json --results bench/results/recipes

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
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.catalog import DEFAULT_CATALOG  # noqa: E402
from core.queries import DEFAULT_EVAL_SET, QuerySet  # noqa: E402
from training.encode import resolve_device  # noqa: E402
from training.evaluate import evaluate  # noqa: E402
from training.train import TrainCfg, field_parser, train  # noqa: E402

MODELS = ("mm3-concat", "text-only", "mm3-mlp", "mm4-concat", "mm3-alpha", "mm4-alpha", "mm4-mlp")
RESULTS = Path(__file__).parent / "results"
BOOKKEEPING = {"save_every", "val_every", "threads", "cache_dir", "device"}  # overrides that leave the model alone
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
    train(TrainCfg(**{**dict(model=name, catalog=args.catalog, out=str(out), limit=args.limit, epochs=args.epochs,
                             val_every=args.val_every, eval_at_start=True, device=args.device), **args.set}))
    config = json.loads((out / "config.json").read_text())
    limit = args.limit or None
    intact = evaluate(out, queries, args.catalog, corpus_limit=limit, device=args.device)
    no_colour = evaluate(out, queries, args.catalog, degrade="colour", corpus_limit=limit, device=args.device)
    history = config["history"]
    label = name + "".join(f" {k}={v}" for k, v in args.set.items() if k not in BOOKKEEPING)
    return {
        "model": name, "label": label, "epochs": args.epochs, "hardware": hardware(args.device),
        "checkpoint": str(out), "products": intact["products"],
        "text": intact["metrics"]["text"], "text_no_colour": no_colour["metrics"]["text"],
        "image": intact["metrics"].get("image"),
        "train_minutes": round(history[-1].get("train_seconds", history[-1]["seconds"]) / 60, 1),
        "curve": [{k: h.get(k) for k in ("step", "train_seconds", "recall@10", "ndcg@10", "image_ndcg@10",
                                         "image_recall@100")} for h in history],
        "rankings": {"text": intact["rankings"]["text"], "text_no_colour": no_colour["rankings"]["text"]},
    }


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["model"] == "text-only"), None)
    mixed = len({_hardware(r) for r in rows}) > 1
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| model | epochs | text nDCG@10 | text R@100 | no-colour nDCG@10 | no-colour R@100 | exclusive@100 "
             "(no colour) | photo nDCG@10 | photo R@10 | photo R@100 | train min |"
             + (" trained on |" if mixed else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if mixed else "")]
    for r in rows:
        image = r["image"] or {}
        exclusive = None
        if base is not None and r is not base and "rankings" in r and "rankings" in base:
            exclusive = exclusive_share(r["rankings"]["text_no_colour"], base["rankings"]["text_no_colour"])
        lines.append(f"| {_label(r)} | {r.get('epochs', 1)} | {fmt(r['text']['ndcg@10'])} | "
                     f"{fmt(r['text']['recall@100'])} | "
                     f"{fmt(r['text_no_colour']['ndcg@10'])} | {fmt(r['text_no_colour']['recall@100'])} | "
                     f"{fmt(exclusive)} | {fmt(image.get('ndcg@10'))} | {fmt(image.get('recall@10'))} | "
                     f"{fmt(image.get('recall@100'))} | {r['train_minutes']} |"
                     + (f" {_hardware(r)} |" if mixed else ""))
    return "\n".join(lines)


def _label(row: dict) -> str:
    return row.get("label", row["model"])


def _hardware(row: dict) -> str:
    return row.get("hardware", "2 CPU cores")  # rows written before the column existed ran on this machine


def curve_table(rows: list[dict]) -> str:
    lines = ["| model | step | training minutes | text R@10 | photo nDCG@10 | photo R@100 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        for point in r["curve"]:
            minutes = (point.get("train_seconds") or 0) / 60
            photo = [point.get("image_ndcg@10"), point.get("image_recall@100")]
            photo = ["-" if v is None else f"{v:.3f}" for v in photo]
            lines.append(f"| {_label(r)} | {point['step']} | {minutes:.1f} | {point['recall@10']:.3f} | "
                         f"{photo[0]} | {photo[1]} |")
    return "\n".join(lines)


def hardware(device: str) -> str:
    d = resolve_device(device)
    if d.type == "cuda":
        import torch

        return f"one {torch.cuda.get_device_name(d)} GPU"
    return f"{os.cpu_count()} CPU cores"


def parse_overrides(items: list[str]) -> dict:
    """`key=value` pairs -> TrainCfg overrides, each value parsed as its field's type."""
    fields = {f.name: f for f in dataclasses.fields(TrainCfg)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item!r}: expected key=value with key one of {', '.join(fields)}")
        out[key] = field_parser(fields[key])(value)
    return out


def plot(rows: list[dict], results: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(4.5, 0.45 * len(rows) + 1)))
    epochs = {r.get("epochs", 1) for r in rows}
    names = [_label(r) + (f", {r.get('epochs', 1)} ep" if len(epochs) > 1 else "") for r in rows]
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
    left.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8)
    for r, name in zip(rows, names):
        points = [p for p in r["curve"] if p.get("image_ndcg@10") is not None]
        if points:
            # Epochs, not minutes: rows trained on different hardware share the axis.
            steps_per_epoch = r["curve"][-1]["step"] / r.get("epochs", 1)
            right.plot([p["step"] / steps_per_epoch for p in points], [p["image_ndcg@10"] for p in points],
                       marker="o", label=name)
    right.set_xlabel("epochs")
    right.set_ylabel("photo nDCG@10 (validation split)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(results.with_suffix(".png"), dpi=120)


def write(rows: list[dict], results: Path, commands: list[str]) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k != "rankings"} for r in rows]
    results.with_suffix(".json").write_text(json.dumps({"commands": commands, "rows": slim}, indent=2) + "\n")
    first = rows[0]
    hw = " and ".join(sorted({_hardware(r) for r in rows}))
    results.with_suffix(".md").write_text(
        "# Tower comparison\n\n" + "".join(f"`{c}`\n" for c in commands)
        + f"\n{first['products']} products, {first['text']['queries']} text "
        f"and {(first['image'] or {}).get('queries', 0)} photo queries of training/eval_sets/fashion.jsonl; "
        f"trained on {hw}. A label's `key=value` is a training.train.TrainCfg override.\n"
        "Recall is capped at min(k, |relevant|). \"no colour\": colour names removed from every product's title "
        "and description before embedding. Photo queries: relevant = the other products of the photo's "
        "article type and colour; the photo's own product is out of the ranking.\n\n"
        + table(rows) + "\n\n## Learning curves (validation split: 5% held-out products)\n\n" + curve_table(rows)
        + f"\n\n![nDCG@10 per model and photo-search learning curves]({results.name}.png)\n")
    plot(rows, results)


def merge(files: list[str], results: Path, command: str) -> None:
    """One table of the rows of several runs (each written by its own --results), e.g. parallel runs on a GPU."""
    rows, commands = [], [command]
    for f in files:
        data = json.loads(Path(f).read_text())
        rows += data["rows"]
        commands += data.get("commands", [data.get("command", f)])
    write(rows, results, commands)
    print(table(rows))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("training").setLevel(logging.INFO)
    logger.setLevel(logging.INFO)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog to train and search on")
    p.add_argument("--queries", default=str(DEFAULT_EVAL_SET), help="evaluation query set")
    p.add_argument("--limit", type=int, default=0, help="first N catalog products to train on and search (0 = all)")
    p.add_argument("--epochs", type=int, default=1, help="training epochs per model")
    p.add_argument("--val-every", type=int, default=100, help="validation steps of the learning curve")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model configs, in this order")
    p.add_argument("--runs", default="runs/compare", help="where the checkpoints go")
    p.add_argument("--device", default="auto", help="where to train and embed: auto (a CUDA GPU if torch sees one), "
                   "cpu, cuda, cuda:N")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a training.train.TrainCfg override for every model (repeatable), e.g. --set lr=2e-3")
    p.add_argument("--results", default=str(RESULTS / "towers"),
                   help="results path without suffix: .md, .json and .png are written there")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="train nothing: write one table from the .json files of earlier runs")
    args = p.parse_args(argv)
    args.set = parse_overrides(args.set)
    command = "python bench/compare_towers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.merge:
        merge(args.merge, Path(args.results), command.strip())
        return
    queries = QuerySet.load(args.queries)
    rows = []
    for name in args.models.split(","):
        rows.append(measure(name, args, queries))
        logger.info("%s: %s", name, {k: rows[-1][k] for k in ("text", "text_no_colour", "image")})
        write(rows, Path(args.results), [command.strip()])
    print(table(rows))


if __name__ == "__main__":
    main()
