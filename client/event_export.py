"""The event store (client/events.py) exported: UBI JSON for tools that speak it, Parquet for analysis.
The store is read as it stands at one moment (pages may keep logging), held in memory while it is written.

    python -m client.event_export --events runs/events.db --out runs/events-export

writes, under --out:
    ubi_queries.ndjson   one UBI query per line (query_id, user_query, query_attributes, query_response_hit_ids...)
    ubi_events.ndjson    one UBI event per line (action_name, query_id, event_attributes.object / .position...)
    queries.parquet      a row per query; model, collection and kind as columns
    impressions.parquet  a row per (query, position): what was shown where, and whether the order was explored
    events.parquet       a row per event, with the model of the query it belongs to
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.events import APPLICATION, OBJECT_ID_FIELD, EventStore, LoggedQuery, add_reader_argument, open_reader

logger = logging.getLogger("client.event_export")
FORMATS = ("ubi", "parquet")


def iso(timestamp: float) -> str:
    """UBI's timestamp: ISO 8601 with an explicit UTC offset (OpenSearch requires one)."""
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="milliseconds")


def ubi_query(query: LoggedQuery) -> dict:
    attributes = {**query.attributes, "kind": query.kind, "model": query.model, "collection": query.collection}
    if query.session_id:
        attributes["session_id"] = query.session_id
    return {"application": APPLICATION, "query_id": query.query_id, "client_id": query.client_id,
            "user_query": query.user_query, "query_attributes": attributes, "object_id_field": OBJECT_ID_FIELD,
            "query_response_id": query.query_id, "query_response_hit_ids": query.hit_ids,
            "timestamp": iso(query.timestamp)}


def ubi_events(events: Iterable[tuple]) -> Iterator[dict]:
    for _, timestamp, action, query_id, object_id, position, client_id, session_id, attributes in events:
        yield {"application": APPLICATION, "action_name": action, "query_id": query_id, "session_id": session_id,
               "client_id": client_id, "timestamp": iso(timestamp),
               "message_type": "IMPRESSION" if action == "impression" else "CONVERSION",
               "event_attributes": {**attributes, "object": {"object_id": object_id,
                                                             "object_id_field": OBJECT_ID_FIELD},
                                    "position": {"ordinal": position}}}


def export(store: EventStore, out: str | Path, formats: tuple[str, ...] = FORMATS) -> dict[str, int]:
    """Writes the files above (those of `formats`); returns the rows written per file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with store.snapshot():  # the queries and events of one moment, while pages keep logging
        queries, events = list(store.queries()), list(store.events())
    written: dict[str, int] = {}
    if "ubi" in formats:
        written["ubi_queries.ndjson"] = _ndjson(out / "ubi_queries.ndjson", (ubi_query(q) for q in queries))
        written["ubi_events.ndjson"] = _ndjson(out / "ubi_events.ndjson", ubi_events(events))
    if "parquet" in formats:
        import pandas as pd

        model = {q.query_id: q.model for q in queries}
        tables = {
            "queries.parquet": pd.DataFrame(
                [{"query_id": q.query_id, "timestamp": q.timestamp, "kind": q.kind, "user_query": q.user_query,
                  "model": q.model, "collection": q.collection, "client_id": q.client_id,
                  "session_id": q.session_id, "served": len(q.hit_ids), "explored": "explore" in q.attributes,
                  "query_attributes": json.dumps(q.attributes, sort_keys=True)} for q in queries]),
            "impressions.parquet": pd.DataFrame(
                [{"query_id": q.query_id, "position": i + 1, "object_id": object_id, "model": q.model,
                  "explored": "explore" in q.attributes} for q in queries for i, object_id in enumerate(q.hit_ids)]),
            "events.parquet": pd.DataFrame(
                [{"event_id": e[0], "timestamp": e[1], "action_name": e[2], "query_id": e[3], "object_id": e[4],
                  "position": e[5], "client_id": e[6], "session_id": e[7], "model": model.get(e[3])}
                 for e in events]),
        }
        for name, frame in tables.items():
            frame.to_parquet(out / name, index=False)
            written[name] = len(frame)
    return written


def _ndjson(path: Path, records) -> int:
    n = 0
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
            n += 1
    return n


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(prog="python -m client.event_export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_reader_argument(p)
    p.add_argument("--out", default="runs/events-export", help="folder the files are written to")
    p.add_argument("--format", choices=FORMATS, action="append",
                   help="ubi (NDJSON in UBI's schema) or parquet; repeat for both; default: both")
    args = p.parse_args(argv)
    written = export(open_reader(p, args.events), args.out, tuple(args.format or FORMATS))
    for name, rows in written.items():
        logger.info("%s: %d rows", Path(args.out) / name, rows)


if __name__ == "__main__":
    main()
