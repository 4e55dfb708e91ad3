"""client.events on a real SQLite file: what is logged, what is refused (and then nothing of its batch), the
retention bound, two stores on one file (two page workers), and the UBI / Parquet export."""

from __future__ import annotations

import json
import sqlite3

import pandas as pd
import pytest

from client.event_export import export
from client.events import Event, EventError, EventStore

pytestmark = pytest.mark.unit
SERVED = ["p1", "p2", "p3"]


@pytest.fixture
def store(tmp_path):
    return EventStore(tmp_path / "events.db")


def _query(store: EventStore, **kw) -> str:
    return store.log_query("text", kw.get("text", "red kurta"), {"mode": "hybrid", "k": 3}, "abc-fp32", "products_v1",
                           kw.get("served", SERVED), client_id="c1", session_id="s1")


def click(query_id: str, object_id: str = "p2", position: int = 2, action: str = "click") -> Event:
    return Event.parse({"action_name": action, "query_id": query_id, "object_id": object_id, "position": position})


def test_events_name_what_their_query_served_where_it_served_it(store):
    query_id = _query(store)
    store.log_events([click(query_id), click(query_id, "p3", 3, "add_to_cart")])
    events = list(store.events())
    assert [(e[2], e[4], e[5]) for e in events] == [("click", "p2", 2), ("add_to_cart", "p3", 3)]
    assert events[0][6:8] == ("c1", "s1")  # the query's shopper, when the event does not name one
    (query,) = store.queries()
    assert query.hit_ids == SERVED and query.model == "abc-fp32" and query.collection == "products_v1"


@pytest.mark.parametrize("bad, words", [
    ({"query_id": "nope"}, "unknown query_id"),
    ({"object_id": "p9"}, "did not serve it"),
    ({"position": 1}, "it served 2"),
    ({"position": 4}, "at position 4"),
])
def test_a_refused_event_logs_nothing_of_its_batch(store, bad, words):
    query_id = _query(store)
    event = {"action_name": "click", "query_id": query_id, "object_id": "p2", "position": 2, **bad}
    with pytest.raises(EventError, match=words):
        store.log_events([click(query_id), Event.parse(event)])
    assert store.counts() == {"queries": 1, "events": 0}


@pytest.mark.parametrize("data, words", [
    ({"action_name": "like"}, "action_name"),
    ({"position": 0}, "1-based"),
    ({"position": True}, "1-based"),
    ({"position": "2"}, "1-based"),
    ({"object_id": ""}, "object_id"),
    ({"query_id": None}, "query_id"),
    ({"client_id": "x" * 101}, "client_id"),
    ({"event_attributes": []}, "event_attributes"),
])
def test_malformed_events_are_refused_with_the_reason(data, words):
    with pytest.raises(EventError, match=words):
        Event.parse({"action_name": "click", "query_id": "q", "object_id": "p", "position": 1, **data})
    with pytest.raises(EventError, match="JSON object"):
        Event.parse(["click"])


def test_ubi_nested_events_are_read_as_the_flat_ones():
    event = Event.parse({"action_name": "click", "query_id": "q",
                         "event_attributes": {"object": {"object_id": "p7", "object_id_field": "product_id"},
                                              "position": {"ordinal": 4}, "dwell_ms": 1200}})
    assert (event.object_id, event.position, event.attributes) == ("p7", 4, {"dwell_ms": 1200})


def test_two_stores_on_one_file_see_each_others_queries(tmp_path):
    """Two page workers: one serves the search, the other logs its click."""
    first, second = EventStore(tmp_path / "shared.db"), EventStore(tmp_path / "shared.db")
    query_id = _query(first)
    second.log_events([click(query_id)])
    assert first.counts() == {"queries": 1, "events": 1}


def test_retention_bounds_the_store_and_deletes_events_with_their_query(tmp_path):
    store = EventStore(tmp_path / "events.db", retention_days=30, max_queries=3)
    ids = [_query(store, text=f"q{i}") for i in range(5)]
    store.log_events([click(ids[0]), click(ids[4])])
    assert store.prune() == 2  # the two oldest queries past the bound of 3, and q0's click
    assert [q.query_id for q in store.queries()] == ids[2:]
    assert [e[3] for e in store.events()] == [ids[4]]
    with sqlite3.connect(store.path) as db:  # a query older than the retention goes at the next prune
        db.execute("UPDATE queries SET timestamp = timestamp - 31 * 86400 WHERE query_id = ?", (ids[2],))
    assert store.prune() == 1 and store.counts()["queries"] == 2
    with pytest.raises(EventError, match="unknown query_id"):
        store.log_events([click(ids[0])])


def test_export_writes_ubi_json_and_parquet(store, tmp_path):
    query_id = _query(store)
    store.log_events([click(query_id)])
    written = export(store, tmp_path / "out")
    assert written == {"ubi_queries.ndjson": 1, "ubi_events.ndjson": 1, "queries.parquet": 1,
                       "impressions.parquet": 3, "events.parquet": 1}
    query = json.loads((tmp_path / "out" / "ubi_queries.ndjson").read_text())
    assert query["query_response_hit_ids"] == SERVED and query["object_id_field"] == "product_id"
    assert query["query_attributes"]["model"] == "abc-fp32" and query["timestamp"].endswith("+00:00")
    event = json.loads((tmp_path / "out" / "ubi_events.ndjson").read_text())
    assert event["event_attributes"]["object"]["object_id"] == "p2"
    assert event["event_attributes"]["position"] == {"ordinal": 2}
    impressions = pd.read_parquet(tmp_path / "out" / "impressions.parquet")
    assert impressions.object_id.tolist() == SERVED and impressions.position.tolist() == [1, 2, 3]
    events = pd.read_parquet(tmp_path / "out" / "events.parquet")
    assert events.model.tolist() == ["abc-fp32"]


def test_the_readers_open_a_store_without_pruning_it_by_their_own_settings(store, tmp_path):
    query_id = _query(store)
    with sqlite3.connect(store.path) as db:  # kept by a page started with a longer retention
        db.execute("UPDATE queries SET timestamp = timestamp - 60 * 86400 WHERE query_id = ?", (query_id,))
    reader = EventStore(store.path, read_only=True)
    assert export(reader, tmp_path / "out")["queries.parquet"] == 1
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.prune()
    with pytest.raises(FileNotFoundError, match="no event store"):
        EventStore(tmp_path / "missing.db", read_only=True)


def test_events_are_committed_with_a_full_sync_and_bounded_per_query(store, monkeypatch):
    import client.events as events

    query_id = _query(store)
    store.log_events([click(query_id)])
    assert store._connection().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: fsynced before the answer
    monkeypatch.setattr(events, "MAX_EVENTS_PER_QUERY", 3)
    store.log_events([click(query_id), click(query_id)])
    with pytest.raises(EventError, match="at most 3"):
        store.log_events([click(query_id)])
    assert store.counts()["events"] == 3


def test_oversized_ids_and_attributes_are_refused_and_a_clients_clock_is_kept_aside():
    base = {"action_name": "click", "query_id": "q", "object_id": "p", "position": 1}
    for data, words in (({"query_id": "q" * 101}, "query_id is longer"), ({"object_id": "p" * 257}, "object_id"),
                        ({"event_attributes": {"blob": "x" * 3000}}, "larger than")):
        with pytest.raises(EventError, match=words):
            Event.parse({**base, **data})
    event = Event.parse({**base, "timestamp": "2026-11-30T10:00:00Z"})
    assert event.timestamp is None and event.attributes == {"client_timestamp": "2026-11-30T10:00:00Z"}


def test_prune_deletes_in_batches(tmp_path, monkeypatch):
    import client.events as events

    monkeypatch.setattr(events, "PRUNE_BATCH", 2)
    store = EventStore(tmp_path / "events.db", max_queries=1)
    ids = [_query(store, text=f"q{i}") for i in range(6)]
    assert store.prune() == 5 and [q.query_id for q in store.queries()] == ids[-1:]
