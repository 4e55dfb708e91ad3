"""Upgrade the served model without downtime, on a Milvus server: index, compare, switch, roll back.

    python -m export --checkpoint runs/new --out model_repository --tag v2       # the new model set
    python client/upgrade.py --tag v2 --milvus-uri http://127.0.0.1:19530        # index, evaluate, switch
    python client/upgrade.py --status --milvus-uri http://127.0.0.1:19530
    python client/upgrade.py --rollback --milvus-uri http://127.0.0.1:19530

    python client/upgrade.py --query-side q1 --events runs/events.db --impressions 2000 --milvus-uri ...

The serving name (`--collection`, default products) is routed by client/serving.py: one row of a
routes collection in the same Milvus (Lite has no aliases; the same mechanism runs everywhere). An
upgrade loads the model set `--tag` into the running Triton (model control explicit, with its admin
key), indexes the catalog through it into a new collection (products__<fingerprint>) while the old
one serves, evaluates both through Triton + Milvus on the same query set, and switches the route only
if the new one answers every query the serving one answers and is not worse by more than `--tolerance`
in nDCG@10 or recall@100 on any query kind. Searchers resolve the name and embed with the model set
the collection records, so no query pairs one model with the other's vectors. The old collection and
model set stay for `--rollback`.

`--query-side TAG` promotes a query model set trained into the serving model's product space
(training/from_judgments.py; export records it as the set's "product_space"): the serving collection
stays as it is (nothing is re-indexed) and the route records the query model set with it, so searchers
embed text queries with TAG and photos with the collection's own set, and refuse any other pairing. It
is promoted only when both hold: offline not worse (the query set, as above, and any held-out numbers
the caller measured), and team-draft interleaving on the page (client/interleave.py) prefers it at the
planned number of interleaved searches (`--impressions`, a horizon fixed in advance). `--rollback`
returns to the previous query model set as it returns to a previous collection.

It needs a Milvus that several processes share (make serve's Lite server, or a cluster): a Lite
file is held by one process, the page's.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python client/upgrade.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client import serving, store
from client.capabilities import capabilities
from client.connection import add_connection_args, connect
from client.encoder import EncoderUnavailable, TritonEncoder, protocol_module
from client.evaluate import evaluate_served
from client.fusion import MODES
from client.index import Indexer
from core.catalog import DEFAULT_CATALOG, CatalogError, ColumnMap
from core.queries import EVAL_SETS
from core.specs import PRODUCT_ENCODER, QUERY_ENCODER, in_model_set

logger = logging.getLogger("client.upgrade")

DEFAULT_TOLERANCE = 0.01  # what the new model may lose per query kind and metric: about the noise of ~200 queries
GATE_METRICS = ("ndcg@10", "recall@100")  # the ranking at the top, and what reaches the candidate list at all


class UpgradeError(RuntimeError):
    pass


@dataclass
class UpgradeReport:
    name: str  # the serving name
    candidate: str  # the collection the new model was indexed into
    fingerprint: str
    current: str | None  # the collection the name served before (None: first deployment)
    candidate_metrics: dict = field(default_factory=dict)
    current_metrics: dict = field(default_factory=dict)
    promoted: bool = False
    why: str = ""
    query_tag: str | None = None  # a query-side promotion: the query model set (the collection stays)
    current_query_tag: str | None = None
    held_out: dict = field(default_factory=dict)  # offline numbers measured by the caller: {"current", "candidate"}
    interleaving: dict = field(default_factory=dict)


def load_model_set(triton_url: str, protocol: str, tag: str, admin_key: str | None, timeout_s: float,
                   reload: bool = False) -> list[str]:
    """Load every model of set `tag` the server's repository holds (model control explicit); returns them.
    `reload`: load the ready ones again too (their configs changed). Every call waits at most `timeout_s`
    (a load: the batch deadline)."""
    module = protocol_module(protocol)
    client = module.InferenceServerClient(triton_url, **(
        {"network_timeout": timeout_s, "connection_timeout": timeout_s} if protocol == "http" else {}))
    deadline = {"client_timeout": timeout_s} if protocol == "grpc" else {}
    # export.serve restricts the repository API to the header "admin-key"; gRPC prefixes restricted headers.
    header = "triton-grpc-protocol-admin-key" if protocol == "grpc" else "admin-key"
    headers = {header: admin_key} if admin_key else None
    try:
        index = client.get_model_repository_index(headers=headers, **(
            {"as_json": True, **deadline} if protocol == "grpc" else {}))
        models = index.get("models", []) if isinstance(index, dict) else index
        names = sorted(m["name"] for m in models if in_model_set(m["name"], tag))
        if not names:
            raise UpgradeError(f"Triton's repository holds no model set {tag!r}: export it first "
                               f"(python -m export --checkpoint RUN --out model_repository --tag {tag})")
        for name in names:
            if reload or not client.is_model_ready(name, **deadline):
                logger.info("loading %s", name)
                client.load_model(name, headers=headers, **deadline)
        return names
    except module.InferenceServerException as exc:
        if any(s in str(exc.status() or "") for s in ("UNAVAILABLE", "DEADLINE")):
            raise EncoderUnavailable(f"Triton at {protocol}://{triton_url} did not answer: start it "
                                     "(python -m export.serve) or pass --triton-url") from None
        raise UpgradeError(f"Triton refused to load model set {tag!r} ({exc}): serve the repository with "
                           "`python -m export.serve --model-control explicit --admin-key KEY` and pass "
                           "--admin-key (or TRITON_ADMIN_KEY)") from None
    finally:
        client.close()


def _evaluate(encoder: TritonEncoder, client, collection: str, args, images: TritonEncoder | None = None) -> dict:
    """Each committed query set's metrics per query kind, keyed "<set>/<kind>" (a query set alone: "<kind>")."""
    out = {}
    for path in committed_sets(args.queries):
        result = evaluate_served(encoder, client, path, args.catalog, ColumnMap.from_args(args), collection,
                                 mode=args.mode, image_encoder=images)
        prefix = f"{path.stem}/" if len(args.queries or EVAL_SETS) > 1 else ""
        out.update({f"{prefix}{kind}": {**{name: m[name] for name in GATE_METRICS}, "recall@10": m["recall@10"],
                                        "queries": m["queries"]} for kind, m in result["metrics"].items()})
    return out


def committed_sets(paths: list[Path] | None) -> list[Path]:
    """The query sets a gate evaluates: those given, or every committed evaluation set this project has."""
    return list(paths) if paths else [p for p in EVAL_SETS if p.is_file()]


def decide(candidate: dict, current: dict, tolerance: float) -> tuple[bool, str]:
    """Promote unless the candidate answers fewer queries of some kind than the serving model (photo
    search lost entirely is the worst loss), or loses more than `tolerance` of any GATE_METRICS on a kind."""
    losses = []
    for kind in sorted(current):
        asked = current[kind].get("queries") or 0
        if not asked:
            continue
        new = candidate.get(kind) or {}
        if (new.get("queries") or 0) < asked:
            losses.append(f"{kind} queries: the serving model answers {asked}, the candidate {new.get('queries') or 0}")
            continue
        losses += [f"{kind} {name} {current[kind][name]:.3f} -> {new[name]:.3f}" for name in GATE_METRICS
                   if new[name] < current[kind][name] - tolerance]
    if losses:
        return False, f"worse than the serving model beyond {tolerance}: " + "; ".join(losses)
    return True, f"not worse than the serving model within {tolerance} ({', '.join(GATE_METRICS)})"


def upgrade(args: argparse.Namespace, client) -> UpgradeReport:
    name = args.collection
    load_model_set(args.triton_url, args.protocol, args.tag, args.admin_key, args.batch_timeout)
    encoder = TritonEncoder(args.triton_url, args.protocol, args.batch_timeout, tag=args.tag)
    encoder.check_ready([QUERY_ENCODER, PRODUCT_ENCODER])
    current = serving.collection_record(client, name) if serving.resolve(client, name) else None
    candidate = serving.versioned_name(name, encoder.fingerprint)
    report = UpgradeReport(name, candidate, encoder.fingerprint, current.collection if current else None)
    if current is not None and current.collection == candidate:
        report.why = f"{name} already serves {candidate} (model {encoder.fingerprint})"
        return report
    store.ensure_collection(client, encoder.embed_dim, candidate, args.index_type, store.METRIC, encoder.fingerprint,
                            args.tag, previous=current.collection if current else None)
    indexer = Indexer(args.triton_url, args.protocol, client, candidate, args.batch_size, args.concurrency,
                      args.retries, timeout_s=args.batch_timeout, tag=args.tag)
    indexed = indexer.run(args.catalog, ColumnMap.from_args(args), args.limit, index_type=args.index_type)
    logger.info("indexed %s: %s", candidate, indexed.summary())
    if indexed.failed:
        raise UpgradeError(f"{len(indexed.failed)} products failed to index into {candidate}: not switching")
    report.candidate_metrics = _evaluate(encoder, client, candidate, args)
    if current is not None:
        current_encoder = TritonEncoder(args.triton_url, args.protocol, args.batch_timeout, tag=current.tag)
        report.current_metrics = _evaluate(current_encoder, client, current.collection, args)
        report.promoted, report.why = decide(report.candidate_metrics, report.current_metrics, args.tolerance)
    else:
        report.promoted, report.why = True, "first deployment: nothing to compare with"
    if report.promoted or args.force:
        serving.switch(client, name, candidate)
        report.promoted = True
        logger.info("%s now serves %s; the previous collection %s stays for --rollback", name, candidate,
                    report.current)
    return report


def interleaving_verdict(events: Path, model_a: str, model_b: str, impressions: int, alpha: float) -> dict:
    """The interleaving report of (serving A, candidate B) from the event log (client/interleave.py)."""
    from client.events import EventStore
    from client.interleave import report

    if not Path(events).is_file():
        raise UpgradeError(f"no event log at {events}: interleave on the page first (client/app.py --candidate)")
    found = [r for r in report(EventStore(events, read_only=True), impressions, alpha)
             if (r["model_a"], r["model_b"]) == (model_a, model_b)]
    if not found:
        return {"model_a": model_a, "model_b": model_b, "interleaved_searches": 0, "planned_impressions": impressions,
                "alpha": alpha, "verdict": None}
    return found[0]


def decide_query_side(offline: tuple[bool, str], held_out: dict, interleaving: dict,
                      tolerance: float) -> tuple[bool, str]:
    """Both must hold: offline not worse (the query set, and the held-out numbers if any), and interleaving
    preferring the candidate (team B) at its planned horizon."""
    ok, reasons = offline[0], [f"offline: {offline[1]}"]
    if held_out:
        worse = held_out["candidate"] < held_out["current"] - tolerance
        ok &= not worse
        reasons.append(f"held-out {held_out.get('metric', 'nDCG@10')} {held_out['current']:.3f} -> "
                       f"{held_out['candidate']:.3f} ({'worse beyond' if worse else 'not worse within'} {tolerance})")
    verdict = interleaving.get("verdict")
    if verdict is None:
        ok = False
        reasons.append(f"interleaving: {interleaving.get('interleaved_searches', 0)} interleaved searches of the "
                       f"{interleaving.get('planned_impressions')} planned: no verdict")
    else:
        preferred = verdict["winner"] == "B"
        ok &= preferred
        outcome = {"B": "the candidate is preferred", "A": "the serving model is preferred"}.get(
            verdict["winner"], "no significant preference")
        reasons.append(f"interleaving: candidate won {verdict['wins_b']}, serving {verdict['wins_a']}, "
                       f"{verdict['ties']} ties of {verdict['impressions']}, p = {verdict['p_value']:.4g}: {outcome}")
    return ok, "; ".join(reasons)


def upgrade_query_side(args: argparse.Namespace, client, held_out: dict | None = None) -> UpgradeReport:
    """Serve model set `args.query_side`'s query encoder with the collection the name serves now, if the gate
    lets it (decide_query_side); `held_out` ({"current": x, "candidate": y}) adds the caller's offline numbers."""
    name, tag = args.collection, args.query_side
    load_model_set(args.triton_url, args.protocol, tag, args.admin_key, args.batch_timeout)
    encoder = TritonEncoder(args.triton_url, args.protocol, args.batch_timeout, tag=tag)
    encoder.check_ready([QUERY_ENCODER])
    current = serving.collection_record(client, name)
    report = UpgradeReport(name, current.collection, encoder.fingerprint, current.collection,
                           query_tag=tag, current_query_tag=current.query_model_set, held_out=held_out or {})
    if encoder.product_space != current.fingerprint:
        raise UpgradeError(f"model set {tag!r} embeds queries into the product space of model {encoder.product_space}, "
                           f"but {name} serves {current.collection} with vectors of model {current.fingerprint}: "
                           "train it from the serving checkpoint (training/from_judgments.py), or upgrade with --tag")
    if current.query_model_set == tag:
        report.why = f"{name} already embeds queries with model set {tag!r}"
        return report
    serving_encoder = TritonEncoder(args.triton_url, args.protocol, args.batch_timeout, tag=current.query_model_set)
    images = TritonEncoder(args.triton_url, args.protocol, args.batch_timeout, tag=current.tag)
    report.candidate_metrics = _evaluate(encoder, client, current.collection, args, images)
    report.current_metrics = _evaluate(serving_encoder, client, current.collection, args, images)
    offline = decide(report.candidate_metrics, report.current_metrics, args.tolerance)
    if args.events:
        # The page logs what ranked each side (core.fusion_rule.ranking_model): a refitted rule is a new candidate.
        report.interleaving = interleaving_verdict(args.events, serving_encoder.ranking_model, encoder.ranking_model,
                                                   args.impressions, args.alpha)
    report.promoted, report.why = decide_query_side(offline, report.held_out, report.interleaving, args.tolerance)
    if report.promoted or args.force:
        serving.switch(client, name, current.collection, query_tag=tag)
        report.promoted = True
        logger.info("%s now embeds queries with model set %s over %s; --rollback returns to %s", name, tag,
                    current.collection, current.query_model_set or "the default set")
    return report


def status(client, name: str) -> dict:
    record = serving.collection_record(client, name) if serving.resolve(client, name) else None
    versions = sorted(c for c in client.list_collections() if c == name or c.startswith(f"{name}__"))
    return {"name": name, "serving": asdict(record) if record else None,
            "routed": serving.route(client, name) is not None, "milvus": capabilities(client).server,
            "collections": {c: asdict(serving.collection_record(client, c)) for c in versions}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import os

    p = argparse.ArgumentParser(prog="python client/upgrade.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--tag", help="the model set to upgrade to (python -m export ... --tag TAG); '' is the "
                                      "repository's default set")
    action.add_argument("--query-side", metavar="TAG",
                        help="promote model set TAG's query encoder over the serving collection (no re-index): a "
                             "query tower trained into its product space (python -m training.from_judgments)")
    action.add_argument("--rollback", action="store_true", help="serve the collection the current one replaced")
    action.add_argument("--status", action="store_true", help="print what the serving name serves and what is kept")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog to index with the new model")
    p.add_argument("--limit", type=int, default=None, help="index only the first N catalog rows")
    p.add_argument("--queries", type=Path, action="append", default=None,
                   help="a query set both models are evaluated on, through Triton and Milvus (repeatable; default: "
                        "every committed evaluation set, training/eval_sets/)")
    p.add_argument("--mode", choices=MODES, default="hybrid",
                   help="how the evaluation searches text queries (as client/search.py --mode)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"promote unless some query kind loses more than this much of {' or '.join(GATE_METRICS)}")
    p.add_argument("--force", action="store_true", help="switch even if the evaluation says worse")
    p.add_argument("--events", type=Path, default=None,
                   help="--query-side: the page's event log holding the interleaved searches (client/app.py "
                        "--events, --candidate); without it there is no interleaving verdict and nothing is promoted")
    p.add_argument("--impressions", type=int, default=2000,
                   help="--query-side: the interleaved searches the verdict is taken on (planned in advance)")
    p.add_argument("--alpha", type=float, default=0.05, help="--query-side: significance level of the sign test")
    p.add_argument("--index-type", choices=list(store.INDEX_PARAMS), default=None,
                   help="vector index of the new collection (default: HNSW where the server has it, else AUTOINDEX)")
    p.add_argument("--batch-size", type=int, default=16, help="products per Triton request while indexing")
    p.add_argument("--concurrency", type=int, default=4, help="Triton requests in flight while indexing")
    p.add_argument("--retries", type=int, default=3, help="retries when Triton is down while indexing")
    p.add_argument("--admin-key", default=os.environ.get("TRITON_ADMIN_KEY"),
                   help="Triton's admin key, to load the model set (env TRITON_ADMIN_KEY)")
    p.add_argument("--json", dest="json_out", type=Path, help="also write the report to this JSON file")
    ColumnMap.add_arguments(p)
    add_connection_args(p, batch=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if store.is_lite(args.milvus_uri):
        print("error: an upgrade runs beside the searchers it switches, so it needs a Milvus they share: the local "
              "server (make serve, then --milvus-uri http://127.0.0.1:19530) or a cluster (docker/). A Lite file "
              "is held by one process (the page's).", file=sys.stderr)
        return 2
    try:
        client = connect(args)
        if args.status:
            print(json.dumps(status(client, args.collection), indent=2))
            return 0
        if args.rollback:
            print(f"{args.collection} serves {serving.rollback(client, args.collection)} again")
            return 0
        report = upgrade_query_side(args, client) if args.query_side else upgrade(args, client)
    except store.errors() as exc:
        print(f"error: {store.failure(exc, args.milvus_uri)}; nothing was switched that did not complete: run the "
              "same command again (the indexed rows are kept)", file=sys.stderr)
        return 2
    except (UpgradeError, EncoderUnavailable, store.StoreError, CatalogError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(asdict(report), indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    print(f"{'switched' if report.promoted else 'kept'}: {report.why}", file=sys.stderr)
    unchanged = (report.current_query_tag == report.query_tag if report.query_tag is not None
                 else report.current in (None, report.candidate))
    return 0 if report.promoted or unchanged else 1


if __name__ == "__main__":
    sys.exit(main())
