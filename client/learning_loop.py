"""Learning from shoppers, in one command on the shared deployment (make serve): simulate, judge, train,
evaluate offline, interleave, then promote or refuse.

    make serve
    python -m client.learning_loop                       # make learn
    python -m client.learning_loop --shuffle-judgments   # a harmful candidate: the gate must refuse it

    shoppers --search/click--> page --events--> click model --judgments--> query tower (product side kept)
        ^                                                                        | export: model set TAG
        |                                                                        v
        +-- serving name <--promote / refuse-- gate <-- offline (committed sets, held-out queries)
                                                    <-- team-draft interleaving on the page

1. collect: SIMULATED shoppers (client/simulated_shoppers.py) search a page on the serving name, which logs
   every search and click (--events) and shows --explore-share of them in a random order;
2. judge: the click model (client/judgments.py) rates each (query, product) with position bias removed;
3. train: python -m training.from_judgments fine-tunes the serving model's query tower into its own product
   space (the serving checkpoint is read from the repository's export report of the serving model set);
4. export: python -m export writes it as model set TAG into the repository the running Triton serves;
   fit: hybrid fusion's rule for the candidate's queries (core/fusion_rule.py: its base lexical weight and when
   BM25 counts as confident) is fitted on the judged queries under the committed sets (client/fusion_fit.py),
   written into the checkpoint's config and exported again with it (`--fusion default` keeps the shipped rule);
5. offline: the candidate behind a candidate serving name (NAME_candidate: the same collection, queries by TAG)
   beside the serving name, on held-out shopper queries (texts no collected session typed), graded by the
   simulator's truth; client/upgrade.py adds the committed evaluation sets;
6. interleave: the page interleaves --interleave-share of its searches with the candidate (team draft) until
   --impressions interleaved searches are logged;
7. gate: client/upgrade.py --query-side TAG promotes (the route gets the query model set; nothing is
   re-indexed) only if offline is not worse and interleaving prefers the candidate; else it refuses.

Each step's output stays in --workdir and a rerun skips the steps already done (delete a step's folder to redo
it). What is simulated: the shoppers and their truth. A real deployment keeps steps 2-7 as they are, with real
shoppers' logs for 1 and 6 and a human-judged held-out set for 5.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client import serving, store
from client.encoder import TritonEncoder
from client.events import EventStore
from client.fusion_fit import committed_metrics, fit_fusion_rule, judged_queries, searched
from client.interleave import report as interleave_report
from client.judgments import DEPTH, MIN_IMPRESSIONS, click_log, judge, write
from client.page_process import PageServer
from client.simulated_eval import Grader, held_out_queries
from client.simulated_eval import evaluate as evaluate_simulated
from client.simulated_shoppers import SIMULATED, ShopperModel, Simulation, load_intents, write_truth
from client.upgrade import UpgradeReport, committed_sets, load_model_set, upgrade_query_side
from core.catalog import DEFAULT_CATALOG
from core.queries import QuerySet
from core.server_process import free_port
from core.specs import FUSION_RULE_KEY, report_file

logger = logging.getLogger("client.learning_loop")

ROOT = Path(__file__).resolve().parents[1]
SHOPPERS = f"{SIMULATED}-shopper"  # the simulated sessions' client_id prefix (the evaluation's is another)
CANDIDATE_SUFFIX = "_candidate"
CHUNK_SESSIONS = 500  # interleaving sessions between two looks at the count of interleaved searches


def serving_checkpoint(repository: Path, tag: str) -> Path:
    """The checkpoint model set `tag` was exported from (its export report)."""
    path = repository / report_file(tag)
    if not path.is_file():
        raise FileNotFoundError(f"no export report {path}: the serving model set {tag!r} was not exported into "
                                f"{repository} (pass --model-repository)")
    checkpoint = Path(json.loads(path.read_text())["checkpoint"])
    if not (checkpoint / "model.safetensors").is_file():
        raise FileNotFoundError(f"the serving model's checkpoint {checkpoint} (from {path}) is gone: pass --checkpoint")
    return checkpoint


def run(command: list[str], log: Path) -> None:
    """A step as a child process (its own torch), its output in `log`; a failure stops the loop."""
    logger.info("$ %s  (log: %s)", " ".join(command), log)
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
    if code:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{command[2]} failed (exit {code}); the end of {log}:\n{tail}")


class Loop:
    def __init__(self, args: argparse.Namespace):
        self.args, self.work = args, Path(args.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.intents, self.weights, median = load_intents(args.catalog, args.seed, args.limit)
        self.shoppers = ShopperModel.make(median, args.seed)
        self.client = store.connect(args.milvus_uri)
        self.record = serving.collection_record(self.client, args.collection)
        self.candidate_name = f"{args.collection}{CANDIDATE_SUFFIX}"
        self._candidate_model: str | None = None

    def page(self, name: str, log: str, events: Path | None = None, explore: float = 0.0,
             extra: list[str] | None = None) -> PageServer:
        a = self.args
        return PageServer(a.triton_url, a.milvus_uri, a.catalog, name, port=free_port(), log_file=self.work / log,
                          events=str(events or ""), explore_share=explore, extra_args=extra or [])

    def collect(self) -> Path:
        folder = self.work / "collect"
        if (folder / "truth.json").is_file():
            logger.info("collect: done before (%s)", folder)
            return folder
        folder.mkdir(exist_ok=True)
        for stale in folder.glob("events.db*"):  # an interrupted collection starts over
            stale.unlink()
        with self.page(self.args.collection, "collect/page.log", folder / "events.db", self.args.explore_share) as page:
            page.warm_up()
            simulation = Simulation(page.url, self.intents, self.weights, self.shoppers, self.args.seed)
            started = time.perf_counter()
            tally = simulation.run(self.args.sessions, self.args.concurrency)
        seconds = time.perf_counter() - started
        settings = {k: v for k, v in vars(self.args).items() if isinstance(v, (str, int, float, bool, type(None)))}
        write_truth(folder / "truth.json", self.shoppers, tally, {**settings, "seconds": seconds})
        logger.info("collect: %d sessions, %d searches, %d clicks in %.1f min (failed: %s)", tally.sessions,
                    tally.searches, tally.clicks, seconds / 60, dict(tally.failed) or "none")
        return folder

    def judge(self, collected: Path) -> Path:
        folder = self.work / "judgments"
        if (folder / "click_model.json").is_file():
            logger.info("judge: done before (%s)", folder)
            return folder
        log = click_log(EventStore(collected / "events.db", read_only=True), DEPTH, client_prefix=SHOPPERS)
        n = write(folder, log, judge(log, DEPTH), DEPTH, MIN_IMPRESSIONS)
        logger.info("judge: %d searches (%d explored), %d clicks: %d (query, product) pairs judged", log.searches,
                    log.explored, int(log.click.sum()), n)
        return folder

    def train(self, judgments: Path) -> Path:
        a, out = self.args, self.work / "checkpoint"
        if (out / "model.safetensors").is_file():
            logger.info("train: done before (%s)", out)
            return out
        base = Path(a.checkpoint) if a.checkpoint else serving_checkpoint(Path(a.model_repository),
                                                                          self.record.query_model_set)
        command = [sys.executable, "-m", "training.from_judgments", "--checkpoint", str(base), "--judgments",
                   str(judgments / "judgments.jsonl"), "--out", str(out), "--catalog", a.catalog, "--steps",
                   str(a.steps), "--seed", str(a.seed), "--cache-dir", a.cache_dir]
        command += ["--limit", str(a.limit)] * bool(a.limit) + ["--shuffle-judgments"] * a.shuffle_judgments
        run(command, self.work / "train.log")
        return out

    def export(self, checkpoint: Path) -> None:
        a = self.args
        if (Path(a.model_repository) / report_file(a.tag)).is_file() and (self.work / "export.done").is_file():
            logger.info("export: model set %s done before", a.tag)
            return
        variant = (self.record.fingerprint or "").split("-", 1)[-1] or "fp32"  # the serving vectors' variant
        command = [sys.executable, "-m", "export", "--checkpoint", str(checkpoint), "--out", a.model_repository,
                   "--tag", a.tag, "--variant", variant, "--measure", variant, "--catalog", a.catalog,
                   "--parity-rows", str(a.parity_rows), "--graphs-dir", str(self.work / "graphs")]
        run(command, self.work / "export.log")
        (self.work / "export.done").write_text(a.tag + "\n")

    def stage(self, reload: bool = False) -> None:
        """Load the model set and route the candidate name: the serving collection, queries by the new set."""
        a = self.args
        load_model_set(a.triton_url, "grpc", a.tag, a.admin_key, a.batch_timeout, reload=reload)
        serving.switch(self.client, self.candidate_name, self.record.collection, query_tag=a.tag)

    def fit_fusion(self, judgments: Path, checkpoint: Path) -> dict | None:
        """Fit the candidate's hybrid fusion rule on the judged queries (client/fusion_fit.py), write it into the
        checkpoint's config, export and reload the model set with it; returns the fit (None with --fusion
        default)."""
        a, path = self.args, self.work / "fusion.json"
        if a.fusion == "default":
            return None
        if path.is_file():
            logger.info("fit: done before (%s)", path)
            return json.loads(path.read_text())
        judged = judged_queries(judgments / "judgments.jsonl", a.fit_queries, a.seed)
        sets = {path.stem: QuerySet.load(path) for path in committed_sets(a.queries)}
        encoder = TritonEncoder(a.triton_url, "grpc", a.batch_timeout, tag=a.tag)
        current = TritonEncoder(a.triton_url, "grpc", a.batch_timeout, tag=self.record.query_model_set)
        try:
            collection = self.record.collection
            metric = store.collection_index(self.client, collection)[1]
            guard = {name: (queries.texts, queries.text_relevant,
                            committed_metrics(searched(current, self.client, collection, queries.texts),
                                              queries.text_relevant, metric, current.fusion_rule))
                     for name, queries in sets.items() if queries.texts}
            fit = fit_fusion_rule(encoder, self.client, collection, judged, guard, a.tolerance)
        finally:
            encoder.close()
            current.close()
        config_path = checkpoint / "config.json"
        config = json.loads(config_path.read_text())
        config[FUSION_RULE_KEY] = fit["chosen"]
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        (self.work / "export.done").unlink(missing_ok=True)
        self.export(checkpoint)
        self.stage(reload=True)
        # Evidence taken with the rule before this fit no longer speaks for the candidate (the fingerprint, which
        # names the weights, stays the same): the offline and interleaving steps start over.
        (self.work / "held_out.json").unlink(missing_ok=True)
        shutil.rmtree(self.work / "interleave", ignore_errors=True)
        path.write_text(json.dumps(fit, indent=1))
        logger.info("fit: fusion rule %s, %d of %d rules allowed by the committed sets; judged nDCG@10 %.4f "
                    "(shipped rule %.4f, best base weight alone %s) over %d judged queries", fit["chosen"],
                    fit["allowed"], fit["rules"], fit["judged_ndcg"]["chosen"], fit["judged_ndcg"]["shipped"],
                    fit["judged_ndcg"]["best_base_weight_only"], fit["queries"])
        return fit

    def offline(self, collected: Path) -> dict:
        path = self.work / "held_out.json"
        if path.is_file():
            return json.loads(path.read_text())
        a = self.args
        exclude = set(json.loads((collected / "truth.json").read_text())["queries"])
        queries = held_out_queries(self.intents, self.weights, a.held_out_queries, a.seed, exclude)
        grader = Grader.from_catalog(a.catalog, a.limit)
        result = {"simulated": True, "queries": len(queries), "mode": a.mode}
        for who, name in (("current", a.collection), ("candidate", self.candidate_name)):
            with self.page(name, f"offline-{who}.log") as page:
                page.warm_up()
                scored = evaluate_simulated(page.url, queries, grader, a.mode)
            if scored["failures"] or scored["ndcg"] is None:
                raise RuntimeError(f"{scored['failures']} of the held-out searches on {name} failed: see "
                                   f"{self.work / f'offline-{who}.log'}")
            result[who] = scored["ndcg"]
        path.write_text(json.dumps(result, indent=1))
        logger.info("offline: SIMULATED held-out nDCG@10 %.4f (serving) -> %.4f (candidate), %d queries",
                    result["current"], result["candidate"], len(queries))
        return result

    def interleave(self) -> Path:
        a, folder = self.args, self.work / "interleave"
        folder.mkdir(exist_ok=True)
        events = folder / "events.db"
        pair_done = lambda: max((r["interleaved_searches"] for r in interleave_report(  # noqa: E731
            EventStore(events, read_only=True)) if r["model_b"] == self.candidate_model()), default=0)
        if events.is_file() and pair_done() >= a.impressions:
            logger.info("interleave: done before (%s)", events)
            return events
        extra = ["--candidate", self.candidate_name, "--interleave-share", str(a.interleave_share)]
        with self.page(a.collection, "interleave/page.log", events, 0.0, extra) as page:
            page.warm_up()
            simulation = Simulation(page.url, self.intents, self.weights, self.shoppers, a.seed)
            start = a.sessions  # sessions after the collected ones: the same shoppers, other visits
            while pair_done() < a.impressions:
                simulation.run(CHUNK_SESSIONS, a.concurrency, start=start, progress=False)
                start += CHUNK_SESSIONS
                logger.info("interleave: %d of %d interleaved searches", pair_done(), a.impressions)
        return events

    def candidate_model(self) -> str:
        if self._candidate_model is None:
            encoder = TritonEncoder(self.args.triton_url, "grpc", self.args.batch_timeout, tag=self.args.tag)
            try:
                self._candidate_model = encoder.ranking_model
            finally:
                encoder.close()
        return self._candidate_model

    def gate(self, held_out: dict, events: Path) -> UpgradeReport:
        from client.upgrade import parse_args as upgrade_args

        a = self.args
        argv = ["--query-side", a.tag, "--collection", a.collection, "--catalog", a.catalog, "--events", str(events),
                "--impressions", str(a.impressions), "--mode", a.mode, "--triton-url", a.triton_url, "--milvus-uri",
                a.milvus_uri, "--tolerance", str(a.tolerance)]
        argv += ["--limit", str(a.limit)] * bool(a.limit)
        for path in a.queries or ():
            argv += ["--queries", str(path)]
        argv += ["--admin-key", a.admin_key] * bool(a.admin_key)
        return upgrade_query_side(upgrade_args(argv), self.client, held_out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m client.learning_loop", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", default="runs/learning", help="every step's output (a rerun resumes from it)")
    p.add_argument("--tag", default=None, help="the candidate's model set (default: q-<date>-<time>, or the "
                                               "workdir's earlier one when resuming)")
    p.add_argument("--milvus-uri", default="http://127.0.0.1:19530", help="the shared Milvus (make serve's)")
    p.add_argument("--triton-url", default="127.0.0.1:8001", help="Triton's gRPC endpoint (make serve's)")
    p.add_argument("--admin-key", default=os.environ.get("TRITON_ADMIN_KEY") or _key_file(),
                   help="Triton's admin key, to load the new model set (default: env TRITON_ADMIN_KEY, or "
                        "make serve's runs/triton/admin-key)")
    p.add_argument("--model-repository", default="model_repository", help="the repository the running Triton serves")
    p.add_argument("--collection", default=store.COLLECTION, help="the serving name")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="the catalog the serving name indexed")
    p.add_argument("--limit", type=int, default=None, help="its first N products only (a deployment made so)")
    p.add_argument("--checkpoint", default=None,
                   help="the serving model's checkpoint (default: from the repository's export report)")
    p.add_argument("--sessions", type=int, default=20_000, help="simulated shopper sessions to learn from")
    p.add_argument("--explore-share", type=float, default=0.5,
                   help="share of the collected searches shown in a random order (the click model's examination)")
    p.add_argument("--concurrency", type=int, default=6, help="simulated sessions at once")
    p.add_argument("--seed", type=int, default=0, help="the simulated shoppers' seed (and the trainer's)")
    p.add_argument("--steps", type=int, default=400, help="query tower optimizer steps")
    p.add_argument("--fusion", choices=("fit", "default"), default="fit",
                   help="fit: fit the candidate's hybrid fusion rule on the judged queries; default: keep "
                        "the shipped rule (core/fusion_rule.py)")
    p.add_argument("--fit-queries", type=int, default=2000,
                   help="judged queries the fusion rule is fitted on (at most)")
    p.add_argument("--shuffle-judgments", action="store_true",
                   help="train on judgments paired with other queries: a harmful candidate the gate must refuse")
    p.add_argument("--held-out-queries", type=int, default=1000, help="held-out shopper queries, offline")
    p.add_argument("--queries", type=Path, action="append", default=None,
                   help="a committed query set of the fit and the offline gate (repeatable; default: every "
                        "committed evaluation set)")
    p.add_argument("--mode", default="hybrid", choices=("hybrid", "dense"), help="how the pages search text")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="what the candidate may lose offline (the gate), and its fitted fusion on the committed set")
    p.add_argument("--interleave-share", type=float, default=0.5, help="share of the page's searches interleaved")
    p.add_argument("--impressions", type=int, default=10_000,
                   help="interleaved searches the verdict is taken on (fixed in advance)")
    p.add_argument("--parity-rows", type=int, default=16, help="export's parity check rows")
    p.add_argument("--batch-timeout", type=float, default=60.0, help="seconds a model load may take")
    p.add_argument("--cache-dir", default="cache", help="decoded images and product vectors (the trainer's)")
    p.add_argument("--json", dest="json_out", type=Path, default=None,
                   help="also write the report here (it is always written to WORKDIR/report.json)")
    args = p.parse_args(argv)
    tag_file = Path(args.workdir) / "tag"
    if args.tag is None:
        args.tag = tag_file.read_text().strip() if tag_file.is_file() else time.strftime("q-%Y%m%d-%H%M%S")
    return args


def _key_file() -> str | None:
    path = ROOT / "runs" / "triton" / "admin-key"
    return path.read_text().strip() if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if store.is_lite(args.milvus_uri):
        print("error: the loop runs pages beside the upgrade that switches them, so it needs a Milvus they share: "
              "make serve, then --milvus-uri http://127.0.0.1:19530", file=sys.stderr)
        return 2
    started = time.perf_counter()
    loop = Loop(args)
    (loop.work / "tag").write_text(args.tag + "\n")
    collected = loop.collect()
    judgments = loop.judge(collected)
    checkpoint = loop.train(judgments)
    loop.export(checkpoint)
    loop.stage()
    fusion = loop.fit_fusion(judgments, checkpoint)
    held_out = loop.offline(collected)
    events = loop.interleave()
    report = loop.gate(held_out, events)

    record = {"tag": args.tag, "minutes": round((time.perf_counter() - started) / 60, 1),
              "sessions": args.sessions, "shuffled_judgments": args.shuffle_judgments,
              "training": json.loads((checkpoint / "config.json").read_text()).get("from_judgments"),
              "click_model": json.loads((judgments / "click_model.json").read_text()), "fusion": fusion,
              **asdict(report)}
    for path in (loop.work / "report.json", args.json_out):
        if path:
            path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{'promoted' if report.promoted else 'refused'} model set {args.tag}: {report.why}")
    return 0 if report.promoted else 1


if __name__ == "__main__":
    sys.exit(main())
