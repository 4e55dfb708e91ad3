"""How far the learning loop's fusion fit (client/fusion_fit.py) can be trusted: the rule fitted on all judged
queries and on random halves of them, for the serving tower and the tower from judgments, each scored on
held-out shopper queries by the SIMULATED truth and on every committed set.

    .venv/bin/python bench/fusion_fit.py --workdir runs/learning   # after make learn (or bench/learning.py)

The judged objective (condensed nDCG@10 of the judged products) is flat across rules: the judged products are
the few the serving ranking showed. A fit that picks by noise would pick different rules on different halves,
and their held-out numbers would scatter; this benchmark shows how much. Every query is searched once per tower
through Triton and Milvus; the fits then run on the fused lists. Writes bench/results/fusion_fit.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from client import serving, store  # noqa: E402
from client.encoder import TritonEncoder  # noqa: E402
from client.fusion_fit import (  # noqa: E402
    GATE_METRICS,
    choose,
    committed_table,
    judged_queries,
    judged_table,
    mean,
    rules,
    score_table,
    searched,
    weights_of,
)
from client.simulated_eval import Grader, held_out_queries  # noqa: E402
from client.simulated_shoppers import load_intents  # noqa: E402
from core.catalog import DEFAULT_CATALOG  # noqa: E402
from core.fusion_rule import SHIPPED, FusionRule  # noqa: E402
from core.queries import EVAL_SETS, QuerySet  # noqa: E402

logger = logging.getLogger("bench.fusion_fit")
RESULTS = ROOT / "bench" / "results"


def tables(encoder: TritonEncoder, client, collection: str, judged: dict, held: list, grader: Grader,
           sets: dict[str, QuerySet], weights: list[float]) -> dict:
    """The judged, held-out and committed queries, each fused at every weight and measured."""
    metric = store.collection_index(client, collection)[1]
    out = {"judged": judged_table(searched(encoder, client, collection, list(judged)), metric, judged, weights)}
    graded = [(t, intent) for t, intent in held if grader.ndcg(intent, []) is not None]
    out["held_out"] = score_table(searched(encoder, client, collection, [t for t, _ in graded]), metric,
                                  lambda i, r: (grader.ndcg(graded[i][1], [h.product_id for h in r]),), weights)
    for name, queries in sets.items():
        out[name] = committed_table(searched(encoder, client, collection, queries.texts), metric,
                                    queries.text_relevant, weights)
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(prog="python bench/fusion_fit.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "learning",
                   help="a learning loop's workdir: its judgments, its sessions' truth.json and its model set tag")
    p.add_argument("--triton-url", default="127.0.0.1:8001", help="Triton's gRPC endpoint (make serve's)")
    p.add_argument("--milvus-uri", default="http://127.0.0.1:19530", help="Milvus (make serve's)")
    p.add_argument("--collection", default=store.COLLECTION, help="the serving name")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="the catalog the serving name indexed")
    p.add_argument("--seed", type=int, default=0, help="the simulator's seed (as the loop's)")
    p.add_argument("--held-out-queries", type=int, default=1000, help="held-out shopper queries")
    p.add_argument("--splits", type=int, default=8, help="random halves of the judged queries to fit on")
    p.add_argument("--tolerance", type=float, default=0.01, help="what a rule may lose on a committed set")
    p.add_argument("--out", type=Path, default=RESULTS / "fusion_fit", help="results: OUT.json and OUT.md")
    args = p.parse_args(argv)
    started, t0 = time.strftime("%Y-%m-%d %H:%M"), time.perf_counter()
    client = store.connect(args.milvus_uri)
    record = serving.collection_record(client, args.collection)
    judged = judged_queries(args.workdir / "judgments" / "judgments.jsonl", 10 ** 6, args.seed)
    intents, weights, _ = load_intents(args.catalog, args.seed)
    exclude = set(json.loads((args.workdir / "collect" / "truth.json").read_text())["queries"])
    held = held_out_queries(intents, weights, args.held_out_queries, args.seed, exclude)
    grader = Grader.from_catalog(args.catalog)
    sets = {path.stem: QuerySet.load(path) for path in EVAL_SETS if path.is_file()}
    sets = {name: queries for name, queries in sets.items() if queries.texts}
    candidates = rules()
    towers = {"serving tower": record.query_model_set,
              "tower from judgments": (args.workdir / "tag").read_text().strip()}
    found = {}
    for name, tag in towers.items():
        encoder = TritonEncoder(args.triton_url, "grpc", 60.0, tag=tag)
        try:
            found[name] = tables(encoder, client, record.collection, judged, held, grader, sets,
                                 weights_of([*candidates, SHIPPED]))
        finally:
            encoder.close()
    serving_tables = found["serving tower"]
    floors = {s: dict(zip(GATE_METRICS, mean(serving_tables[s], SHIPPED))) for s in sets}
    baseline = mean(serving_tables["held_out"], SHIPPED)[0]
    rows = []
    for name, t in found.items():
        guard = {s: (t[s], floors[s]) for s in sets}
        fits = [("all judged queries", t["judged"])]
        rng = random.Random(args.seed)
        fits += [(f"half {i + 1}", rng.sample(t["judged"], len(t["judged"]) // 2)) for i in range(args.splits)]
        for label, judged_rows in fits:
            fit = choose(judged_rows, guard, args.tolerance, candidates)
            rule = FusionRule.from_dict(fit["chosen"])
            worst = min(mean(t[s], rule)[i] - floors[s][m] for s in sets for i, m in enumerate(GATE_METRICS))
            rows.append({"tower": name, "fit on": label, "judged queries": len(judged_rows), "rule": fit["chosen"],
                         "allowed": fit["allowed"], "judged_ndcg": fit["judged_ndcg"]["chosen"],
                         "held_out": round(mean(t["held_out"], rule)[0], 4), "worst_committed": round(worst, 4)})
            logger.info("%s, %s: %s held-out %.4f", name, label, fit["chosen"], rows[-1]["held_out"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    meta = {"command": "python bench/fusion_fit.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "commit": commit.strip(), "started": started, "minutes": round((time.perf_counter() - t0) / 60, 1),
            "judged_queries": len(judged), "held_out_queries": len(found["serving tower"]["held_out"]),
            "rules": len(candidates), "serving_shipped_held_out": round(baseline, 4), "towers": towers}
    write_results(args.out, meta, rows)
    return 0


def write_results(out: Path, meta: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "fits": rows}, indent=1) + "\n")
    lines = ["# SIMULATED: the fusion fit on all judged queries and on random halves", "",
             f"`{meta['command']}` at {meta['commit']}, {meta['started']}: {meta['rules']} candidate rules, "
             f"{meta['judged_queries']:,} judged text queries, {meta['held_out_queries']} held-out shopper queries "
             "(graded by the simulator's truth). The serving tower under the shipped rule scores "
             f"{meta['serving_shipped_held_out']:.4f} held-out; worst committed: the largest loss of any committed "
             "set's text nDCG@10 or R@100 from it (the fit allows -0.01).", "",
             "| tower | fit on | base | lead >= | fewer hits than | rules allowed | judged nDCG@10 | held-out nDCG@10 "
             "| worst committed |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rule = r["rule"]
        lines.append(f"| {r['tower']} | {r['fit on']} ({r['judged queries']}) | {rule['base_weight']} | "
                     f"{rule['lead_ratio'] or '-'} | {rule['rare_hits'] or '-'} | {r['allowed']} | "
                     f"{r['judged_ndcg']:.4f} | {r['held_out']:.4f} | {r['worst_committed']:+.4f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
