"""The verdict of team-draft interleaving (core/interleaving.py) from the event log: did shoppers prefer the page's
model (team A) or the candidate (team B)?

    python -m client.interleave --events runs/events.db
    python -m client.interleave --events runs/events.db --impressions 5000 --json

The page interleaves a share of its searches with a candidate (client/app.py --candidate, --interleave-share) and
logs each product's team with the query. Here every interleaved search is credited: a click on a product credits
the team that placed it, and the search is a win for the team with more clicks (a tie otherwise). The verdict is
the exact sign test on the first --impressions interleaved searches of each (A, B) model pair: the horizon is fixed
in advance, because stopping at the first small p-value declares winners of A/A tests far more often than alpha.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.events import EventStore, add_reader_argument, open_reader
from core.interleaving import Verdict, credit, verdict

logger = logging.getLogger("client.interleave")


def outcomes(store: EventStore, action: str = "click") -> dict[tuple[str, str], list[tuple[int, int]]]:
    """(clicks on team A, clicks on team B) of every interleaved search, in time order, by (A model, B model)."""
    with store.snapshot():
        acted: dict[str, set[int]] = {}
        for e in store.events():
            if e[2] == action:
                acted.setdefault(e[3], set()).add(e[5])
        logged = [q for q in store.queries() if "interleave" in q.attributes]
    by_pair: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for query in logged:
        info = query.attributes["interleave"]
        pair = (query.model, info["candidate_model"])
        by_pair.setdefault(pair, []).append(credit(info["teams"], acted.get(query.query_id, ())))
    return by_pair


def report(store: EventStore, impressions: int | None = None, alpha: float = 0.05) -> list[dict]:
    """A verdict per (A, B) model pair; with `impressions`, on that many searches (and None until there are)."""
    out = []
    for (model_a, model_b), results in outcomes(store).items():
        enough = impressions is None or len(results) >= impressions
        decided: Verdict | None = verdict(results[:impressions] if impressions else results, alpha) if enough else None
        out.append({"model_a": model_a, "model_b": model_b, "interleaved_searches": len(results),
                    "planned_impressions": impressions, "alpha": alpha,
                    "verdict": asdict(decided) if decided else None})
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(prog="python -m client.interleave", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_reader_argument(p)
    p.add_argument("--impressions", type=int, default=None,
                   help="the planned number of interleaved searches the verdict is taken on (default: all so far, "
                        "for a look; a decision needs the horizon fixed in advance)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the sign test")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    reports = report(open_reader(p, args.events), args.impressions, args.alpha)
    if args.json:
        print(json.dumps(reports, indent=1))
    elif not reports:
        logger.info("no interleaved searches in the log (start the page with --candidate and --interleave-share)")
    for r in reports if not args.json else ():
        v = r["verdict"]
        if v is None:
            logger.info("A %s vs B %s: %d interleaved searches of the %d planned: no verdict yet", r["model_a"],
                        r["model_b"], r["interleaved_searches"], r["planned_impressions"])
            continue
        logger.info("A %s vs B %s: %d searches, A won %d, B won %d, %d ties; p = %.4f: %s", r["model_a"], r["model_b"],
                    v["impressions"], v["wins_a"], v["wins_b"], v["ties"], v["p_value"],
                    f"{v['winner']} is preferred" if v["winner"] else "no significant preference")
    return reports


if __name__ == "__main__":
    main()
