"""SIMULATED shoppers against the real page, and how well the click model recovers their position bias.

    .venv/bin/python bench/shoppers.py          # on the shared deployment (make serve); bench/results/shoppers.*

A page (client/app.py) on `make serve`'s Triton and Milvus, logging to a fresh event store, with an explore share
(the top 10 of that share of searches shown in a random order). Simulated shoppers
(client/simulated_shoppers.py) drive its API over HTTP in chunks; after each chunk the position-based click
model is fitted on everything logged so far (client/judgments.py) and its examination probabilities are compared
with the simulator's, position by position: the curve of the worst relative error against sessions. Three
estimates: from the randomized searches (what client/judgments.py uses), PBM's examination fitted jointly with
attractiveness by EM (the textbook fit), and the raw click-through rate by position over position 1's on the
searches shown in the served order (what a dashboard of clicks shows), which mixes position with attractiveness.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from client.events import EventStore  # noqa: E402
from client.judgments import MIN_IMPRESSIONS, ClickLog, click_log, judge  # noqa: E402
from client.page_process import PageServer  # noqa: E402
from client.simulated_shoppers import DEPTH, SIMULATED, Intent, ShopperModel, Simulation, load_intents  # noqa: E402
from core.catalog import DEFAULT_CATALOG, read_catalog  # noqa: E402
from core.clickmodels import PBM  # noqa: E402
from core.server_process import free_port  # noqa: E402

logger = logging.getLogger("bench.shoppers")
RESULTS = ROOT / "bench" / "results"
TARGET = 0.10  # relative error of every position's examination probability


def relative_errors(estimate, truth) -> list[float]:
    return [abs(e - t) / t for e, t in zip(estimate, truth)]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def judgment_quality(log: ClickLog, fitted: PBM, model: ShopperModel, intents: dict[str, dict],
                     products: dict[str, dict]) -> dict:
    """The judged pairs' ratings against the simulator's true attractiveness, beside each pair's raw click rate
    (position bias left in): rank correlation and mean absolute error, over pairs shown MIN_IMPRESSIONS times."""
    truth, judged, raw, positions = [], [], [], []
    mean_position = (np.bincount(log.pair, weights=log.position, minlength=len(log.pairs))
                     / np.maximum(fitted.impressions, 1))
    for i, (_, text, _, object_id) in enumerate(log.pairs):
        if fitted.impressions[i] < MIN_IMPRESSIONS or text not in intents or object_id not in products:
            continue
        truth.append(model.attractiveness(Intent(**intents[text]), products[object_id], object_id))
        judged.append(fitted.attractiveness[i])
        raw.append(fitted.clicks[i] / fitted.impressions[i])
        positions.append(mean_position[i])
    truth, judged, raw = np.array(truth), np.array(judged), np.array(raw)
    low = np.array(positions) > 5  # pairs mostly shown low on the page, where position bias bites
    return {"pairs": len(truth), "spearman_judged": _spearman(judged, truth), "spearman_raw": _spearman(raw, truth),
            "mae_judged": float(np.abs(judged - truth).mean()), "mae_raw": float(np.abs(raw - truth).mean()),
            "low_pairs": int(low.sum()), "mae_judged_low": float(np.abs(judged - truth)[low].mean()),
            "mae_raw_low": float(np.abs(raw - truth)[low].mean())}


def write_results(out: Path, record: dict) -> None:
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    meta, curve = record["meta"], record["curve"]
    final = curve[-1]
    truth = record["truth"]
    lines = [
        "# SIMULATED shoppers: position bias recovered from the logs",
        "",
        "Every click here is simulated (client/simulated_shoppers.py); the page, Triton, Milvus and the event "
        "store are the real ones.",
        "",
        f"`{meta['command']}` at {meta['commit']}, {meta['started']}: page on {meta['milvus_uri']}"
        f"{' (' + meta['model_note'] + ')' if meta.get('model_note') else ''}, explore share "
        f"{meta['explore_share']}, {meta['concurrency']} sessions at once, simulator seed {meta['seed']}, "
        f"examination 1 / r ** {meta['eta']}.",
        "",
        f"After {final['sessions']:,} sessions ({final['searches']:,} searches, {final['explored']:,} explored, "
        f"{final['clicks']:,} clicks, {final['minutes']:.1f} minutes of traffic; failed calls: "
        f"{final['failed'] or 'none'}):",
        "",
        "| position | simulator's examination | from randomized searches | error | PBM joint EM | error "
        "| raw CTR / CTR at 1 (served order) | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in range(DEPTH):
        lines.append(f"| {r + 1} | {truth[r]:.3f} | {final['examination'][r]:.3f} | {100 * final['errors'][r]:.1f}% "
                     f"| {final['joint'][r]:.3f} | {100 * final['joint_errors'][r]:.1f}% "
                     f"| {final['raw'][r]:.3f} | {100 * final['raw_errors'][r]:.1f}% |")
    reached = next((p for p in curve if max(p["errors"]) <= TARGET), None)
    lines += [
        "",
        "Worst error over positions 1-10 against sessions:",
        "",
        "| sessions | searches | explored | minutes | from randomized searches | PBM joint EM | raw CTR |",
        "|---|---|---|---|---|---|---|",
        *[f"| {p['sessions']:,} | {p['searches']:,} | {p['explored']:,} | {p['minutes']:.1f} | "
          f"{100 * max(p['errors']):.1f}% | {100 * max(p['joint_errors']):.1f}% | {100 * max(p['raw_errors']):.1f}% |"
          for p in curve],
        "",
        (f"Target (every position within {100 * TARGET:.0f}%): reached after {reached['sessions']:,} sessions."
         if reached else f"Target (every position within {100 * TARGET:.0f}%): not reached in this run."),
    ]
    q = record.get("judgments")
    if q:
        lines += [
            "",
            f"Judgments (client/judgments.py) of the {q['pairs']:,} (query, product) pairs shown at least "
            f"{MIN_IMPRESSIONS} times, against the simulator's true attractiveness, beside each pair's raw click "
            "rate:",
            "",
            "| rating | rank correlation with the truth | mean absolute error | same, pairs mostly below position 5 |",
            "|---|---|---|---|",
            f"| PBM attractiveness (position bias out) | {q['spearman_judged']:.3f} | {q['mae_judged']:.3f} | "
            f"{q['mae_judged_low']:.3f} ({q['low_pairs']:,} pairs) |",
            f"| raw click rate | {q['spearman_raw']:.3f} | {q['mae_raw']:.3f} | {q['mae_raw_low']:.3f} |",
        ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib missing: no plot")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    positions = range(1, DEPTH + 1)
    left.plot(positions, truth, "k-o", label="simulator (truth)")
    left.plot(positions, final["examination"], "b-s", label="from randomized searches")
    left.plot(positions, final["joint"], "g-.d", label="PBM joint EM")
    left.plot(positions, final["raw"], "r--^", label="raw CTR / CTR at 1")
    left.set(xlabel="position", ylabel="examination probability", title="SIMULATED: examination by position")
    left.legend()
    right.plot([p["sessions"] for p in curve], [100 * max(p["errors"]) for p in curve], "b-s",
               label="from randomized searches")
    right.plot([p["sessions"] for p in curve], [100 * max(p["joint_errors"]) for p in curve], "g-.d",
               label="PBM joint EM")
    right.plot([p["sessions"] for p in curve], [100 * max(p["raw_errors"]) for p in curve], "r--^", label="raw CTR")
    right.axhline(100 * TARGET, color="gray", linestyle=":", label="target")
    right.set(xlabel="simulated sessions", ylabel="worst relative error, %", xscale="log", yscale="log",
              title="positions 1-10")
    right.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(prog="python bench/shoppers.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--triton-url", default="127.0.0.1:8001", help="Triton's gRPC endpoint (make serve's)")
    p.add_argument("--milvus-uri", default="http://127.0.0.1:19530", help="Milvus (make serve's)")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog of the page and of the intents")
    p.add_argument("--sessions", type=int, default=20_000, help="simulated sessions in all")
    p.add_argument("--checkpoints", default="1000,2500,5000,10000",
                   help="session counts (below --sessions) at which the click model is fitted too")
    p.add_argument("--explore-share", type=float, default=0.5, help="the page's --explore-share")
    p.add_argument("--concurrency", type=int, default=6, help="simulated sessions at once")
    p.add_argument("--eta", type=float, default=1.0, help="the simulator's examination: 1 / r ** eta")
    p.add_argument("--seed", type=int, default=0, help="the simulator's seed")
    p.add_argument("--model-note", default="", help="what the page serves, for the results' header")
    p.add_argument("--workdir", type=Path, default=None, help="event store and logs (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=RESULTS / "shoppers", help="results: OUT.json, OUT.md and OUT.png")
    args = p.parse_args(argv)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="mmsearch-shoppers-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    events = workdir / "events.db"
    for stale in workdir.glob("events.db*"):
        stale.unlink()
    started = time.strftime("%Y-%m-%d %H:%M")
    intents, weights, median = load_intents(args.catalog, args.seed)
    model = ShopperModel.make(median, args.seed, args.eta)
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",") if c and int(c) < args.sessions}
                         | {args.sessions})
    catalog, _ = read_catalog(args.catalog)
    products = {str(r["product_id"]): r for r in
                catalog[["product_id", "article_type", "base_colour", "gender", "price"]].to_dict("records")}
    del catalog
    curve, done, seconds = [], 0, 0.0
    page = PageServer(args.triton_url, args.milvus_uri, args.catalog, port=free_port(), log_file=workdir / "page.log",
                      events=str(events), explore_share=args.explore_share)
    with page:
        page.warm_up()
        simulation = Simulation(page.url, intents, weights, model, args.seed)
        for checkpoint in checkpoints:
            t0 = time.perf_counter()
            tally = simulation.run(checkpoint - done, args.concurrency, start=done, progress=sys.stderr.isatty())
            seconds += time.perf_counter() - t0
            done = checkpoint
            log = click_log(EventStore(events, read_only=True), DEPTH, client_prefix=SIMULATED)
            fitted, joint = judge(log, DEPTH), judge(log, DEPTH, joint=True)
            # What a dashboard of clicks shows: the served order's click rates (the randomized searches left out).
            raw = log.raw_ctr(DEPTH, where=~log.randomized)
            raw = [r / raw[0] for r in raw]
            point = {"sessions": done, "searches": log.searches, "explored": log.explored,
                     "clicks": int(log.click.sum()), "minutes": seconds / 60,
                     "examination": [float(g) for g in fitted.examination],
                     "errors": relative_errors(fitted.examination, model.examination), "raw": raw,
                     "raw_errors": relative_errors(raw, model.examination),
                     "joint": [float(g) for g in joint.examination],
                     "joint_errors": relative_errors(joint.examination, model.examination),
                     "em_iterations": joint.iterations,
                     "failed": dict(tally.failed)}
            curve.append(point)
            logger.info("%d sessions, %d searches (%.1f min): worst examination error %.1f%% (raw CTR %.1f%%)",
                        done, log.searches, seconds / 60, 100 * max(point["errors"]), 100 * max(point["raw_errors"]))
    quality = judgment_quality(log, fitted, model, simulation.tally.queries, products)
    logger.info("judgments vs true attractiveness: Spearman %.3f (raw CTR %.3f), MAE %.3f (raw %.3f)",
                quality["spearman_judged"], quality["spearman_raw"], quality["mae_judged"], quality["mae_raw"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    command = "python bench/shoppers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "commit": commit, "started": started, "milvus_uri": args.milvus_uri,
            "explore_share": args.explore_share, "concurrency": args.concurrency, "seed": args.seed, "eta": args.eta,
            "simulated": True, "model_note": args.model_note}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, {"meta": meta, "truth": model.examination, "curve": curve, "judgments": quality})
    logger.info("results in %s.{md,json,png}", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
