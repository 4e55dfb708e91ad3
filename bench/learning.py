"""SIMULATED learning from shoppers, end to end on the shared deployment: the loop with a harmful candidate (its
query tower trained on shuffled judgments; it must be refused), the loop with the real one (it must be promoted),
the committed evaluation sets for both beside the serving model, and A/A interleaving on the page.

    .venv/bin/python bench/learning.py          # make serve first; bench/results/learning.{json,md}

Both loops learn from the same collected sessions and judgments (the harmful run copies them from the first).
The A/A part interleaves the serving name with a second name routed to the same collection and query model:
its interleaved searches are cut into --aa-runs consecutive blocks of --aa-impressions, each judged by the sign
test as a run of its own; a correct test declares a winner in about alpha of them. The deployment is rolled
back to what it served at the start when the bench ends (pass --keep to leave the promotion in place).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from client import serving, store  # noqa: E402
from client.encoder import TritonEncoder  # noqa: E402
from client.evaluate import evaluate_served  # noqa: E402
from client.events import EventStore  # noqa: E402
from client.fusion import combine  # noqa: E402
from client.interleave import outcomes  # noqa: E402
from client.learning_loop import main as loop_main  # noqa: E402
from client.page_process import PageServer  # noqa: E402
from client.simulated_shoppers import ShopperModel, Simulation, load_intents  # noqa: E402
from core.catalog import DEFAULT_CATALOG  # noqa: E402
from core.interleaving import verdict  # noqa: E402
from core.queries import EVAL_SETS  # noqa: E402
from core.server_process import free_port  # noqa: E402

logger = logging.getLogger("bench.learning")
RESULTS = ROOT / "bench" / "results"
AA_NAME = "products_aa"


def committed_sets(args, client, record: serving.CollectionRecord, query_tag: str) -> dict:
    """Every committed evaluation set, searched as served: queries by `query_tag`, photos by the collection's set."""
    encoder = TritonEncoder(args.triton_url, "grpc", 60.0, tag=query_tag)
    images = TritonEncoder(args.triton_url, "grpc", 60.0, tag=record.tag)
    out = {}
    for path in EVAL_SETS:
        result = evaluate_served(encoder, client, path, args.catalog, collection=record.collection, mode=args.mode,
                                 image_encoder=images)
        out[path.stem] = {kind: {k: m[k] for k in ("ndcg@10", "recall@10", "recall@100", "queries")}
                          for kind, m in result["metrics"].items()}
    return out


def aa_interleaving(args, client, record: serving.CollectionRecord, workdir: Path) -> dict:
    serving.switch(client, AA_NAME, record.collection, query_tag=record.query_tag or "")
    events = workdir / "aa-events.db"
    for stale in workdir.glob("aa-events.db*"):
        stale.unlink()
    intents, weights, median = load_intents(args.catalog, args.seed)
    page = PageServer(args.triton_url, args.milvus_uri, args.catalog, args.collection, port=free_port(),
                      log_file=workdir / "aa-page.log", events=str(events),
                      extra_args=["--candidate", AA_NAME, "--interleave-share", "1.0"])
    needed, start, started = args.aa_runs * args.aa_impressions, 10 ** 6, time.perf_counter()
    with page:
        page.warm_up()
        simulation = Simulation(page.url, intents, weights, ShopperModel.make(median, args.seed), args.seed)
        while True:
            results = [r for rs in outcomes(EventStore(events, read_only=True)).values() for r in rs]
            if len(results) >= needed:
                break
            simulation.run(1000, args.concurrency, start=start, progress=False)
            start += 1000
            logger.info("A/A: %d of %d interleaved searches", len(results), needed)
    blocks = [verdict(results[i * args.aa_impressions:(i + 1) * args.aa_impressions]) for i in range(args.aa_runs)]
    return {"runs": args.aa_runs, "impressions": args.aa_impressions, "minutes": (time.perf_counter() - started) / 60,
            "winners": sum(b.winner is not None for b in blocks), "p_values": [round(b.p_value, 4) for b in blocks]}


ABLATION_BASES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.35)  # base weights tried with each rule's confidence tests


def rule_text(rule: dict) -> str:
    """A fusion rule in a few words: its base weight and the confidence tests beyond the shipped one."""
    tests = [f"lead >= {rule['lead_ratio']}"] * (rule.get("lead_ratio") is not None)
    tests += [f"< {rule['rare_hits']} BM25 hits"] * bool(rule.get("rare_hits"))
    return f"base {rule['base_weight']}" + (f", confident also at {' or '.join(tests)}" if tests else "")


def ablation(args, client, record: serving.CollectionRecord, tags: dict[str, str], truth: Path,
             fitted: dict) -> dict:
    """Each query tower under each fusion rule: the shipped rule, the fitted one, and each rule's confidence
    tests at every base weight of ABLATION_BASES; on the loop's held-out shopper queries (the simulator's truth)
    and every committed set's text queries. Which part of the gain is the tower's, which the fusion's."""
    from dataclasses import replace

    from client.fusion_fit import committed_metrics, searched
    from client.simulated_eval import Grader, held_out_queries
    from core.fusion_rule import SHIPPED, FusionRule
    from core.queries import QuerySet

    intents, weights, _ = load_intents(args.catalog, args.seed)
    held = held_out_queries(intents, weights, args.held_out_queries, args.seed,
                            set(json.loads(truth.read_text())["queries"]))
    grader = Grader.from_catalog(args.catalog)
    sets = {path.stem: QuerySet.load(path) for path in EVAL_SETS}
    fitted_rule = FusionRule.from_dict(fitted)
    variants = {"shipped rule": SHIPPED, "fitted rule": fitted_rule}
    for base in ABLATION_BASES:
        variants[f"shipped tests, base {base}"] = replace(SHIPPED, base_weight=base)
        variants[f"fitted tests, base {base}"] = replace(fitted_rule, base_weight=base)
    metric = store.collection_index(client, record.collection)[1]
    out = {}
    for name, tag in tags.items():
        encoder = TritonEncoder(args.triton_url, "grpc", 60.0, tag=tag)
        lists = searched(encoder, client, record.collection, [t for t, _ in held])
        fixed = {s: searched(encoder, client, record.collection, q.texts) for s, q in sets.items() if q.texts}
        encoder.close()
        rows = {}
        for variant, rule in variants.items():
            scores = [grader.ndcg(intent, [h.product_id for h in combine("hybrid", d, lx, metric, rule)])
                      for (_, intent), d, lx in zip(held, *lists)]
            scores = [x for x in scores if x is not None]
            rows[variant] = {"rule": json.loads(rule.to_json()), "held_out": round(sum(scores) / len(scores), 4),
                             "sets": {s: committed_metrics(fixed[s], sets[s].text_relevant, metric, rule)
                                      for s in fixed}}
        out[name] = rows
    return out


def write_results(out: Path, record: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    good, bad, aa, meta = record["good"], record["harmful"], record["aa"], record["meta"]
    held = good["held_out"]
    lines = [
        "# SIMULATED learning from shoppers: judgments -> query tower -> offline + interleaving -> gate",
        "",
        f"`{meta['command']}` at {meta['commit']}, {meta['started']}: the shared deployment on {meta['milvus_uri']} "
        f"({meta['products']:,} products), {meta['sessions']:,} simulated sessions collected with explore share "
        f"{meta['explore_share']}, {meta['minutes']:.0f} minutes in all. Every click is SIMULATED "
        "(client/simulated_shoppers.py); the held-out relevance is the simulator's truth.",
        "",
        "| candidate | held-out shopper queries nDCG@10 (serving -> candidate) | interleaved searches | "
        "candidate wins / serving wins / ties | p | gate |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in ((f"query tower from judgments, fusion {rule_text(good['fusion']['chosen'])}", good),
                    ("query tower from shuffled judgments", bad)):
        v, h = r["interleaving"]["verdict"], r["held_out"]
        gain = 100 * (h["candidate"] - h["current"])
        lines.append(f"| {name} | {h['current']:.4f} -> {h['candidate']:.4f} ({gain:+.1f} points) | "
                     f"{v['impressions']:,} | {v['wins_b']:,} / {v['wins_a']:,} / {v['ties']:,} | "
                     f"{v['p_value']:.2g} | {'promoted' if r['promoted'] else 'refused'} |")
    verdict_word = {True: "promoted", False: "refused"}
    lines += ["", f"Gate's reasons, tower from judgments ({verdict_word[good['promoted']]}): {good['why']}", "",
              f"Gate's reasons, tower from shuffled judgments ({verdict_word[bad['promoted']]}): {bad['why']}", "",
              "Committed evaluation sets, as served (text queries by the query model; photos by the collection's):",
              "", "| set | kind | serving nDCG@10 | candidate | shuffled | serving R@100 | candidate | shuffled |",
              "|---|---|---|---|---|---|---|---|"]
    sets = record["committed"]
    for name in sets["serving"]:
        for kind, m in sets["serving"][name].items():
            c, s = sets["candidate"][name][kind], sets["harmful"][name][kind]
            lines.append(f"| {name} | {kind} ({m['queries']}) | {m['ndcg@10']:.4f} | {c['ndcg@10']:.4f} | "
                         f"{s['ndcg@10']:.4f} | {m['recall@100']:.4f} | {c['recall@100']:.4f} | "
                         f"{s['recall@100']:.4f} |")
    t = good["training"]
    lines += [
        "",
        f"Training (training/from_judgments.py): {t['judged_queries']:,} judged text queries ({t['positives']:,} "
        f"products rated >= {t['min_rating']}), {t['anchor_queries']:,} anchor queries from the training "
        f"generator at share {t['anchor_share']}, {t['steps']} steps of {t['batch_size']}, {t['seconds'] / 60:.1f} "
        f"min; loss {t['loss_first']:.3f} -> {t['loss_last']:.3f}. Held-out: {held['queries']} shopper queries no "
        "collected session typed, graded against every catalog product by the simulator's intent, searched through "
        f"the page ({held['mode']}).",
        "",
        f"A/A interleaving on the page (the serving model against itself under another name): {aa['runs']} runs of "
        f"{aa['impressions']:,} interleaved searches, {aa['winners']} declared a winner at alpha 0.05 "
        f"(p-values {', '.join(f'{p:.2f}' for p in aa['p_values'])}; {aa['minutes']:.1f} min of traffic).",
    ]
    towers = record["ablation"]
    floor = towers["serving tower"]["shipped rule"]["sets"]
    lines += ["", "Ablation: each query tower under each fusion rule (hybrid search; the shipped rule: base 0.35, "
              f"confident at best/10th >= 1.5; fitted: {rule_text(good['fusion']['chosen'])}). Each cell: held-out "
              "shopper queries nDCG@10 &#124; the worst change of any committed set's text nDCG@10 or R@100 from "
              "the serving tower under the shipped rule (the gate allows -0.01).", "",
              "| rule | " + " | ".join(towers) + " |", "|---|" + "---|" * len(towers)]

    def worst(sets: dict) -> float:
        return min(m[k] - floor[s][k] for s, m in sets.items() for k in m)

    for variant in next(iter(towers.values())):
        cells = [f"{r[variant]['held_out']:.4f} &#124; {worst(r[variant]['sets']):+.3f}" for r in towers.values()]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(prog="python bench/learning.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--triton-url", default="127.0.0.1:8001", help="Triton's gRPC endpoint (make serve's)")
    p.add_argument("--milvus-uri", default="http://127.0.0.1:19530", help="Milvus (make serve's)")
    p.add_argument("--model-repository", default="model_repository", help="the repository Triton serves")
    p.add_argument("--collection", default=store.COLLECTION, help="the serving name")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="the catalog the serving name indexed")
    p.add_argument("--sessions", type=int, default=20_000, help="simulated sessions the loops learn from")
    p.add_argument("--impressions", type=int, default=10_000, help="interleaved searches each verdict is taken on")
    p.add_argument("--held-out-queries", type=int, default=1000, help="held-out shopper queries, offline")
    p.add_argument("--aa-runs", type=int, default=20, help="A/A runs")
    p.add_argument("--aa-impressions", type=int, default=1000, help="interleaved searches per A/A run")
    p.add_argument("--concurrency", type=int, default=6, help="simulated sessions at once")
    p.add_argument("--seed", type=int, default=0, help="the simulator's seed")
    p.add_argument("--mode", default="hybrid", choices=("hybrid", "dense"), help="how the pages search text")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-learning", help="the loops' workdirs")
    p.add_argument("--keep", action="store_true", help="leave the promoted query model serving at the end")
    p.add_argument("--out", type=Path, default=RESULTS / "learning", help="results: OUT.json and OUT.md")
    args = p.parse_args(argv)
    started, t0 = time.strftime("%Y-%m-%d %H:%M"), time.perf_counter()
    client = store.connect(args.milvus_uri)
    start_record = serving.collection_record(client, args.collection)
    common = ["--milvus-uri", args.milvus_uri, "--triton-url", args.triton_url, "--model-repository",
              args.model_repository, "--collection", args.collection, "--catalog", args.catalog, "--sessions",
              str(args.sessions), "--impressions", str(args.impressions), "--concurrency", str(args.concurrency),
              "--seed", str(args.seed), "--mode", args.mode, "--held-out-queries", str(args.held_out_queries)]
    good_dir, bad_dir = args.workdir / "good", args.workdir / "harmful"
    tag = time.strftime("%Y%m%d-%H%M")
    if not (good_dir / "tag").is_file():
        good_dir.mkdir(parents=True, exist_ok=True)
        (good_dir / "tag").write_text(f"q-{tag}\n")
    # The harmful candidate first: it learns from the same sessions and must leave the deployment as it was.
    if not (bad_dir / "collect").is_dir():
        bad_dir.mkdir(parents=True, exist_ok=True)
        loop = _collect_and_judge(common, good_dir)
        shutil.copytree(loop / "collect", bad_dir / "collect")
        shutil.copytree(loop / "judgments", bad_dir / "judgments")
        (bad_dir / "tag").write_text(f"h-{tag}\n")
    loop_main([*common, "--workdir", str(bad_dir), "--shuffle-judgments"])
    harmful = json.loads((bad_dir / "report.json").read_text())
    assert serving.collection_record(client, args.collection) == start_record, "a refused candidate changed the route"
    loop_main([*common, "--workdir", str(good_dir)])
    good = json.loads((good_dir / "report.json").read_text())
    committed = {"serving": committed_sets(args, client, start_record, start_record.query_model_set),
                 "candidate": committed_sets(args, client, start_record, good["query_tag"]),
                 "harmful": committed_sets(args, client, start_record, harmful["query_tag"])}
    towers = ablation(args, client, start_record, {"serving tower": start_record.query_model_set,
                                                   "tower from judgments": good["query_tag"],
                                                   "tower from shuffled judgments": harmful["query_tag"]},
                      good_dir / "collect" / "truth.json", good["fusion"]["chosen"])
    aa = aa_interleaving(args, client, serving.collection_record(client, args.collection), args.workdir)
    if good["promoted"] and not args.keep:
        serving.switch(client, args.collection, start_record.collection, start_record.query_tag or "")
        logger.info("rolled %s back to what it served at the start (--keep leaves the promotion)", args.collection)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    meta = {"command": "python bench/learning.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "commit": commit.strip(), "started": started, "milvus_uri": args.milvus_uri,
            "products": store.count(client, start_record.collection), "sessions": args.sessions,
            "explore_share": 0.5, "minutes": (time.perf_counter() - t0) / 60}
    write_results(args.out, {"meta": meta, "good": good, "harmful": harmful, "committed": committed, "aa": aa,
                             "ablation": towers})
    logger.info("results in %s.md", args.out)
    return 0 if good["promoted"] and not harmful["promoted"] else 1


def _collect_and_judge(common: list[str], workdir: Path) -> Path:
    """The first two steps of the loop in `workdir` (shared by both candidates)."""
    from client.learning_loop import Loop, parse_args

    loop = Loop(parse_args([*common, "--workdir", str(workdir)]))
    loop.judge(loop.collect())
    return workdir


if __name__ == "__main__":
    sys.exit(main())
