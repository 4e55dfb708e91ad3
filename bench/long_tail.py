"""The long tail in one table: photo and text search on the balanced set (one query per look) beside the
popular-look set, for trained checkpoints, their baselines and the supervised probe.

    python bench/long_tail.py --checkpoint "default=runs/mm3-concat" --untrained mm3-concat

Each checkpoint is scored in process (training.evaluate: the PyTorch towers in FP32, exact search over the
whole catalog; the served numbers, through Triton and Milvus, come from client/evaluate.py) on
- training/eval_sets/fashion-balanced.jsonl: its photo queries (macro over looks, and nDCG@10 by the look's
  size) and its text queries, on the intact catalog and with every colour word removed from every product's
  title and description (training.evaluate --degrade colour: what is found then comes from the photo);
- training/eval_sets/fashion.jsonl (drawn by product, so popular looks fill it): photo and text queries.
`--untrained CONFIG` adds that config's towers as initialised (the seed training uses), a baseline any
training must beat. The probe's row is bench/results/probe.json (bench/probe.py), when present.
Writes bench/results/long_tail.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.catalog import DEFAULT_CATALOG  # noqa: E402
from core.metrics import RELEVANT_BUCKETS  # noqa: E402
from core.queries import BALANCED_EVAL_SET, DEFAULT_EVAL_SET, QuerySet  # noqa: E402
from training.evaluate import evaluate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("bench.long_tail")


def untrained_checkpoint(config: str, runs: Path) -> Path:
    """`config`'s towers as training.train initialises them (the same seed), saved as a checkpoint."""
    import torch

    from training.factory import create_model, create_tokenizer, save_checkpoint

    out = runs / f"untrained-{config}"
    if not (out / "model.safetensors").is_file():
        torch.manual_seed(0)
        save_checkpoint(create_model(config), create_tokenizer(config), out)
    return out


def score(label: str, checkpoint: Path, args: argparse.Namespace) -> dict:
    balanced, popular = QuerySet.load(args.balanced), QuerySet.load(args.popular)
    row = {"label": label, "checkpoint": str(checkpoint)}
    for key, queries, degrade in (("balanced", balanced, None), ("balanced_no_colour", balanced, "colour"),
                                  ("popular", popular, None)):
        result = evaluate(checkpoint, queries, args.catalog, degrade=degrade, cache_dir=args.cache_dir,
                          device=args.device)
        row[key] = {kind: {"micro": result["metrics"][kind], "groups": result["groups"].get(kind)}
                    for kind in result["metrics"]}
        logger.info("%s %s: %s", label, key, {k: round(v["micro"]["ndcg@10"], 3) for k, v in row[key].items()})
    return row


def probe_row(path: Path) -> dict | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    sets = data["sets"]
    run = data["run"]
    label = f"supervised probe (ResNet-18, {run['minutes']} min on {run['device']})"

    def image(name: str) -> dict:
        s = next(v for k, v in sets.items() if k.startswith(name))
        return {"image": {"micro": s["micro"], "groups": s["groups"]}}

    return {"label": label, "checkpoint": str(path), "balanced": image("balanced"), "popular": image("popular")}


def _get(row: dict, key: str, kind: str, path: tuple[str, ...]) -> float | None:
    node = row.get(key, {}).get(kind)
    for part in path:
        if not node or part not in node:
            return None
        node = node[part]
    return node


def table(rows: list[dict]) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    buckets = [label for _, _, label in RELEVANT_BUCKETS]
    lines = ["| model | balanced photos: macro nDCG@10 | R@100 | " + " | ".join(buckets)
             + " | popular photos: micro / macro nDCG@10 | balanced texts | balanced texts, no colour words "
             "| popular texts |",
             "|---|---|---|" + "---|" * len(buckets) + "---|---|---|---|"]
    for r in rows:
        by_size = [fmt(_get(r, "balanced", "image", ("groups", "by_relevant", b, "ndcg@10"))) for b in buckets]
        lines.append(
            f"| {r['label']} | {fmt(_get(r, 'balanced', 'image', ('groups', 'macro', 'ndcg@10')))} | "
            f"{fmt(_get(r, 'balanced', 'image', ('groups', 'macro', 'recall@100')))} | " + " | ".join(by_size)
            + f" | {fmt(_get(r, 'popular', 'image', ('micro', 'ndcg@10')))} / "
            f"{fmt(_get(r, 'popular', 'image', ('groups', 'macro', 'ndcg@10')))} | "
            f"{fmt(_get(r, 'balanced', 'text', ('groups', 'macro', 'ndcg@10')))} | "
            f"{fmt(_get(r, 'balanced_no_colour', 'text', ('groups', 'macro', 'ndcg@10')))} | "
            f"{fmt(_get(r, 'popular', 'text', ('micro', 'ndcg@10')))} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    buckets = [label for _, _, label in RELEVANT_BUCKETS]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(rows))
    for k, r in enumerate(rows):
        values = [_get(r, "balanced", "image", ("groups", "by_relevant", b, "ndcg@10")) or 0 for b in buckets]
        ax.bar([i + (k - (len(rows) - 1) / 2) * width for i in range(len(buckets))], values, width, label=r["label"])
    ax.set_xticks(range(len(buckets)), [f"{b} products" for b in buckets])
    ax.set_ylabel("photo nDCG@10 (balanced set, own product excluded)")
    ax.set_xlabel("products of the photo's look (article type and colour) in the catalog")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logger.setLevel(logging.INFO)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", action="append", default=[], metavar="LABEL=DIR",
                   help="a checkpoint to score, under a label (repeatable; rows in this order)")
    p.add_argument("--untrained", action="append", default=[], metavar="CONFIG",
                   help="also score this model config untrained (saved under --runs)")
    p.add_argument("--probe", default=str(RESULTS / "probe.json"), help="bench/probe.py's results, if present")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog searched")
    p.add_argument("--balanced", default=str(BALANCED_EVAL_SET), help="the balanced query set")
    p.add_argument("--popular", default=str(DEFAULT_EVAL_SET), help="the popular-look query set")
    p.add_argument("--runs", default="runs", help="where untrained checkpoints are saved")
    p.add_argument("--cache-dir", default="cache", help="where images and product embeddings are cached")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--results", default=str(RESULTS / "long_tail"), help="results path without suffix")
    args = p.parse_args(argv)
    targets = []
    for item in args.checkpoint:
        label, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--checkpoint {item!r}: expected LABEL=DIR")
        targets.append((label, Path(path)))
    targets += [(f"{config}, untrained", untrained_checkpoint(config, Path(args.runs))) for config in args.untrained]
    if not targets:
        raise SystemExit("nothing to score: pass --checkpoint LABEL=DIR or --untrained CONFIG")
    rows = [score(label, path, args) for label, path in targets]
    probe = probe_row(Path(args.probe))
    if probe is not None:
        rows.append(probe)
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/long_tail.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out.with_suffix(".json").write_text(json.dumps({"command": command.strip(), "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        "# The long tail: balanced and popular sets\n\n" + f"`{command.strip()}`\n\n"
        "In process (PyTorch, FP32, exact search over the whole catalog). Photo queries: relevant = the catalog "
        "products of the photo's article type and colour, its own product excluded. Balanced: one photo and one "
        "text query per look, looks drawn uniformly (training/make_balanced_sets.py); its columns are macro "
        "averages over looks, and the photo nDCG@10 by the look's size. Popular: training/eval_sets/fashion.jsonl "
        "(drawn by product). No colour words: every base-colour word removed from every product's text.\n\n"
        + table(rows) + f"\n\n![balanced photo nDCG@10 by look size]({out.name}.png)\n")
    plot(rows, out)
    print(table(rows))


if __name__ == "__main__":
    main()
