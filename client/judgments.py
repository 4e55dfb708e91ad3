"""Judgments from the event log: the position-based click model (core/clickmodels.py) fitted on what the page
served and what shoppers clicked, so a product is rated by its attractiveness for a query with the position
bias taken out.

    python -m client.judgments --events runs/events.db --out runs/judgments

writes, under --out:
    judgments.jsonl    one line per (query, product) shown at least --min-impressions times: the query (its
                       words, kind and filter), object_id, rating (PBM attractiveness, 0..1), impressions, clicks
    click_model.json   examination probability per position (position 1 = 1), raw CTR per position, counts

Examination comes from the searches the page showed in a random order (its --explore-share); without any, the
command refuses: position bias cannot be told from attractiveness on a fixed ranking.

A query is the words (or photo digest), kind and filter as logged; the same words from every shopper are one
query. Impressions are each search's served products at positions 1..--depth; a click is any `click` event
on one of them (several clicks of one result count once).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.events import EventStore, add_reader_argument, open_reader
from core.clickmodels import PBM, examination_from_randomized, fit_pbm

logger = logging.getLogger("client.judgments")
DEPTH = 10
MIN_IMPRESSIONS = 3


@dataclass
class ClickLog:
    """Impressions as arrays, and what each pair index stands for."""

    pairs: list[tuple[str, str, str, str]]  # (kind, user_query, filter, object_id)
    pair: np.ndarray
    position: np.ndarray
    click: np.ndarray
    randomized: np.ndarray  # whether the impression's search showed its top in a random order
    searches: int
    explored: int  # searches whose top was shown in a random order

    def raw_ctr(self, depth: int, where: np.ndarray | None = None) -> list[float | None]:
        """Click-through rate per position, over the impressions `where` selects (default: all)."""
        position, click = (self.position, self.click) if where is None else (self.position[where], self.click[where])
        shown = np.bincount(position - 1, minlength=depth)[:depth]
        clicked = np.bincount(position - 1, weights=click, minlength=depth)[:depth]
        return [float(c / s) if s else None for c, s in zip(clicked, shown)]


def click_log(store: EventStore, depth: int = DEPTH, client_prefix: str = "") -> ClickLog:
    """Every logged search's impressions up to `depth` and whether each was clicked; only the searches of
    client_ids starting with `client_prefix`, when given."""
    with store.snapshot():  # clicks and the queries they belong to, of one moment
        clicked = {(e[3], e[5]) for e in store.events() if e[2] == "click"}
        logged = list(store.queries())
    index: dict[tuple[str, str, str, str], int] = {}
    pair, position, click, randomized = [], [], [], []
    searches = explored = 0
    for query in logged:
        if client_prefix and not (query.client_id or "").startswith(client_prefix):
            continue
        searches += 1
        shuffled = _shuffled_depth(query.attributes.get("explore")) >= depth
        explored += shuffled
        key = (query.kind, query.user_query, str(query.attributes.get("filter", "")))
        for rank, object_id in enumerate(query.hit_ids[:depth], start=1):
            pair.append(index.setdefault((*key, object_id), len(index)))
            position.append(rank)
            click.append((query.query_id, rank) in clicked)
            randomized.append(shuffled and len(query.hit_ids) >= depth)
    return ClickLog(list(index), np.array(pair, np.int64), np.array(position, np.int64), np.array(click, bool),
                    np.array(randomized, bool), searches, explored)


def _shuffled_depth(explore: str | None) -> int:
    """How deep a search's top was shuffled, from its logged "explore" attribute ("shuffle-top-10"); 0 if not."""
    if not explore or not explore.startswith("shuffle-top-"):
        return 0
    return int(explore.removeprefix("shuffle-top-"))


def judge(log: ClickLog, depth: int = DEPTH, prior: float = 1.0, joint: bool = False) -> PBM:
    """PBM on the log: examination from its randomized searches, then attractiveness by EM with it held;
    `joint`: both by EM (the textbook fit, which drifts on sparse pairs: core/clickmodels.py)."""
    if not len(log.pair):
        raise ValueError("no searches in the event log: nothing to judge (is the page logging? --events)")
    examination = None
    if not joint:
        if not log.randomized.any():
            raise ValueError(f"no randomized searches in the log: position bias cannot be told from attractiveness "
                             f"(start the page with --explore-share, e.g. 0.1, at depth {depth})")
        examination = examination_from_randomized(log.position[log.randomized], log.click[log.randomized], depth)
        examination = np.clip(examination, 1e-3, 1.0)
    return fit_pbm(log.pair, log.position, log.click, n_pairs=len(log.pairs), n_positions=depth, prior=prior,
                   examination=examination)


def write(out: Path, log: ClickLog, model: PBM, depth: int, min_impressions: int, joint: bool = False) -> int:
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out / "judgments.jsonl", "w") as f:
        for i, (kind, user_query, filter_, object_id) in enumerate(log.pairs):
            if model.impressions[i] < min_impressions:
                continue
            f.write(json.dumps({"query": user_query, "kind": kind, "filter": filter_, "object_id": object_id,
                                "rating": round(float(model.attractiveness[i]), 4),
                                "impressions": int(model.impressions[i]), "clicks": int(model.clicks[i])}) + "\n")
            n += 1
    report = {"examination": [round(float(g), 4) for g in model.examination],
              "examination_from": "joint EM" if joint else "randomized searches", "raw_ctr": log.raw_ctr(depth),
              "searches": log.searches, "explored_searches": log.explored, "impressions": int(len(log.pair)),
              "clicks": int(log.click.sum()), "pairs": len(log.pairs), "judged_pairs": n,
              "min_impressions": min_impressions, "em_iterations": model.iterations, "converged": model.converged}
    (out / "click_model.json").write_text(json.dumps(report, indent=1))
    return n


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(prog="python -m client.judgments", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_reader_argument(p)
    p.add_argument("--out", default="runs/judgments", help="folder of judgments.jsonl and click_model.json")
    p.add_argument("--depth", type=int, default=DEPTH, help="positions of each search the click model sees")
    p.add_argument("--min-impressions", type=int, default=MIN_IMPRESSIONS,
                   help="a (query, product) pair shown fewer times than this is not judged")
    p.add_argument("--prior", type=float, default=1.0,
                   help="pseudo-impressions at the mean rate that smooth each pair's attractiveness")
    p.add_argument("--joint", action="store_true",
                   help="fit examination by EM together with attractiveness, instead of from the randomized searches")
    p.add_argument("--client-prefix", default="",
                   help="judge only the searches of client_ids starting with this (e.g. 'simulated-')")
    args = p.parse_args(argv)
    log = click_log(open_reader(p, args.events), args.depth, args.client_prefix)
    model = judge(log, args.depth, args.prior, args.joint)
    n = write(Path(args.out), log, model, args.depth, args.min_impressions, args.joint)
    report = json.loads((Path(args.out) / "click_model.json").read_text())
    logger.info("%d searches (%d explored), %d clicks: %d pairs judged; examination by position: %s",
                log.searches, log.explored, int(log.click.sum()), n, report["examination"])
    return report


if __name__ == "__main__":
    main()
