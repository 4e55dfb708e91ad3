"""What shoppers do, logged in the terms of User Behavior Insights (UBI 1.3): queries, impressions, events.

A *query* is one search the page answered: its `query_id` (returned with the results), what was asked
(`user_query`: the words, or a photo's name and digest), the filters and mode (`query_attributes`), the model
fingerprint and the collection that served it, and the product ids in the order served
(`query_response_hit_ids`). Those are the query's *impressions*: object `query_response_hit_ids[i]` was shown at
position i + 1. An *event* is what a shopper did with one of them: `action_name` (click, add_to_cart, purchase,
or impression when a page reports what scrolled into view), `query_id`, `object_id` (a product id) and
`position` (1-based, UBI's `position.ordinal`).

The store is SQLite in WAL mode, one file on the page's host:
- every page worker (process or thread) opens the same file; SQLite's locking serialises their writes, so an
  event is checked against a query another worker served;
- an event is acknowledged after its transaction commits with synchronous=FULL (the WAL is fsynced): a kill -9
  of the page, or of the host, loses no acknowledged event. A query is committed with synchronous=NORMAL before
  its results are returned: a killed page loses none, a power loss may lose the last ones (their later events are
  then refused as unknown);
- bounded: queries older than `retention_days`, or past the newest `max_queries`, are deleted with their events
  (every PRUNE_EVERY queries a process logs, and when a store opens for writing), a batch per transaction; a query
  holds at most MAX_EVENTS_PER_QUERY events of at most MAX_ATTRIBUTE_BYTES of attributes each; SQLite reuses the
  freed pages, so the file stops growing.
One host only: pods on several nodes need a store they share over the network (a database, a queue).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("client.events")

DEFAULT_PATH = "runs/events.db"  # the page's --events, and what the tools that read the log open
APPLICATION = "mmsearch"
OBJECT_ID_FIELD = "product_id"
ACTIONS = ("impression", "click", "add_to_cart", "purchase")
MAX_ID_CHARS = 100  # UBI's limit on query_id, client_id and session_id
MAX_OBJECT_ID_CHARS = 256  # UBI's limit on object_id
MAX_ATTRIBUTE_BYTES = 2048  # an event's own event_attributes, as JSON
MAX_BATCH = 1000  # events in one request
MAX_EVENTS_PER_QUERY = 200  # events logged for one query in all: a client replaying events cannot grow the store
RETENTION_DAYS = 30.0
MAX_QUERIES = 5_000_000
PRUNE_EVERY = 1000
PRUNE_BATCH = 10_000  # queries deleted per transaction: other workers' writes wait at most one batch
BUSY_TIMEOUT_S = 5.0  # how long a write waits for another worker's transaction before it fails

SCHEMA = """
CREATE TABLE IF NOT EXISTS queries (
    query_id TEXT PRIMARY KEY,
    timestamp REAL NOT NULL,
    kind TEXT NOT NULL,
    user_query TEXT NOT NULL,
    query_attributes TEXT NOT NULL,
    model TEXT NOT NULL,
    collection TEXT NOT NULL,
    hit_ids TEXT NOT NULL,
    client_id TEXT,
    session_id TEXT
);
CREATE INDEX IF NOT EXISTS queries_by_time ON queries (timestamp);
CREATE TABLE IF NOT EXISTS events (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp REAL NOT NULL,
    action_name TEXT NOT NULL,
    query_id TEXT NOT NULL REFERENCES queries (query_id) ON DELETE CASCADE,
    object_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    client_id TEXT,
    session_id TEXT,
    event_attributes TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_query ON events (query_id);
"""


class EventError(ValueError):
    """An event the store refuses (unknown query, an object not served there, a malformed field): nothing of
    its batch is logged."""


@dataclass
class Event:
    action_name: str
    query_id: str
    object_id: str
    position: int
    client_id: str | None = None
    session_id: str | None = None
    timestamp: float | None = None  # seconds since the epoch: the store's clock (a client's goes to attributes)
    attributes: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, data: Mapping) -> Event:
        """One event from JSON: the flat form (`object_id`, `position`), or UBI's nested
        `event_attributes.object.object_id` and `event_attributes.position.ordinal`."""
        if not isinstance(data, Mapping):
            raise EventError(f"an event is a JSON object, not {type(data).__name__}")
        attributes = data.get("event_attributes")
        attributes = {} if attributes is None else attributes
        if not isinstance(attributes, Mapping):
            raise EventError("event_attributes must be an object")
        nested_object = attributes.get("object") if isinstance(attributes.get("object"), Mapping) else {}
        nested_position = attributes.get("position") if isinstance(attributes.get("position"), Mapping) else {}
        object_id = data.get("object_id", nested_object.get("object_id"))
        position = data.get("position", nested_position.get("ordinal"))
        action = data.get("action_name")
        if action not in ACTIONS:
            raise EventError(f"action_name must be one of {', '.join(ACTIONS)}, not {action!r}")
        for name, value, limit in (("query_id", data.get("query_id"), MAX_ID_CHARS),
                                   ("object_id", object_id, MAX_OBJECT_ID_CHARS)):
            if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value).strip():
                raise EventError(f"{name} is missing or not a string")
            if len(str(value)) > limit:
                raise EventError(f"{name} is longer than {limit} characters")
        if not isinstance(position, int) or isinstance(position, bool) or position < 1:
            raise EventError(f"position must be a 1-based integer, not {position!r}")
        ids = {}
        for name in ("client_id", "session_id"):
            value = data.get(name)
            if value is not None and (not isinstance(value, str) or len(value) > MAX_ID_CHARS):
                raise EventError(f"{name} must be a string of at most {MAX_ID_CHARS} characters")
            ids[name] = value
        extra = {k: v for k, v in attributes.items() if k not in ("object", "position")}
        if data.get("timestamp") is not None:  # the client's clock, kept beside the store's
            extra["client_timestamp"] = data["timestamp"]
        if len(json.dumps(extra)) > MAX_ATTRIBUTE_BYTES:
            raise EventError(f"event_attributes are larger than {MAX_ATTRIBUTE_BYTES} bytes as JSON")
        return cls(action, str(data["query_id"]), str(object_id), position, ids["client_id"], ids["session_id"],
                   attributes=extra)


@dataclass
class LoggedQuery:
    query_id: str
    timestamp: float
    kind: str
    user_query: str
    attributes: dict
    model: str
    collection: str
    hit_ids: list[str]
    client_id: str | None
    session_id: str | None


def new_query_id() -> str:
    return str(uuid.uuid4())


class EventStore:
    """The SQLite store above. One connection per thread (sqlite3 connections are not shared across threads)."""

    def __init__(self, path: str | Path, retention_days: float = RETENTION_DAYS, max_queries: int = MAX_QUERIES,
                 read_only: bool = False):
        """`read_only`: for the tools that read the log (export, judgments): an existing store, opened without
        creating anything or pruning it by retention settings that may not be the page's."""
        self.path = Path(path)
        self.retention_days, self.max_queries, self.read_only = retention_days, max_queries, read_only
        self._local = threading.local()
        self._lock = threading.Lock()
        self._since_prune = 0
        if read_only:
            if not self.path.is_file():
                raise FileNotFoundError(f"no event store at {self.path}")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._connection().executescript(SCHEMA)
        self.prune()

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            # Autocommit mode: each statement, or each BEGIN ... COMMIT below, is its own transaction.
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            if self.read_only:
                connection.execute("PRAGMA query_only=ON")
            else:
                connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA foreign_keys=ON")
            self._local.connection = connection
        return connection

    def log_query(self, kind: str, user_query: str, attributes: Mapping, model: str, collection: str,
                  hit_ids: Sequence[str], client_id: str | None = None, session_id: str | None = None) -> str:
        """Logs one served search and returns its query_id; committed when this returns."""
        query_id = new_query_id()
        connection = self._connection()
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute(
            "INSERT INTO queries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (query_id, time.time(), kind, user_query, json.dumps(dict(attributes), sort_keys=True), model,
             collection, json.dumps(list(hit_ids)), client_id, session_id))
        with self._lock:
            self._since_prune += 1
            prune = self._since_prune >= PRUNE_EVERY
            if prune:
                self._since_prune = 0
        if prune:
            try:
                self.prune()
            except sqlite3.Error:  # the query is committed: a failed prune is retried at the next round
                logger.warning("event store: pruning failed", exc_info=True)
        return query_id

    def log_events(self, events: Sequence[Event]) -> list[LoggedQuery]:
        """Checks every event against the query it names (served there, at that position), then commits all of
        them durably in one transaction, or raises EventError and logs none. Returns the queries they name."""
        if not events:
            raise EventError("no events")
        if len(events) > MAX_BATCH:
            raise EventError(f"{len(events):,} events in one request; the limit is {MAX_BATCH:,}")
        connection = self._connection()
        connection.execute("PRAGMA synchronous=FULL")
        queries: dict[str, LoggedQuery] = {}
        now = time.time()
        connection.execute("BEGIN IMMEDIATE")  # the checks and the writes see one state of the store
        try:
            for event in events:
                query = queries.get(event.query_id) or self._query(connection, event.query_id)
                if query is None:
                    raise EventError(f"unknown query_id {event.query_id!r}: events name a query the page served "
                                     f"(its search response's query_id), within the last {self.retention_days:g} days")
                queries[event.query_id] = query
                served = query.hit_ids[event.position - 1] if event.position <= len(query.hit_ids) else None
                if served != event.object_id:
                    where = (f"it served {query.hit_ids.index(event.object_id) + 1}"
                             if event.object_id in query.hit_ids else "it did not serve it")
                    raise EventError(f"query {event.query_id} did not serve {event.object_id!r} at position "
                                     f"{event.position} ({where})")
            for query_id in queries:
                logged = connection.execute("SELECT count(*) FROM events WHERE query_id = ?", (query_id,)).fetchone()[0]
                if logged + sum(e.query_id == query_id for e in events) > MAX_EVENTS_PER_QUERY:
                    raise EventError(f"query {query_id} has {logged} events logged; at most "
                                     f"{MAX_EVENTS_PER_QUERY} are kept per query")
            connection.executemany(
                "INSERT INTO events (timestamp, action_name, query_id, object_id, position, client_id, session_id, "
                "event_attributes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(e.timestamp or now, e.action_name, e.query_id, e.object_id, e.position,
                  e.client_id or queries[e.query_id].client_id, e.session_id or queries[e.query_id].session_id,
                  json.dumps(e.attributes, sort_keys=True)) for e in events])
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return [queries[e.query_id] for e in events]

    @staticmethod
    def _query(connection: sqlite3.Connection, query_id: str) -> LoggedQuery | None:
        row = connection.execute("SELECT * FROM queries WHERE query_id = ?", (query_id,)).fetchone()
        return None if row is None else _logged_query(row)

    def prune(self) -> int:
        """Deletes queries past the retention or the size bound, with their events, PRUNE_BATCH queries per
        transaction; returns how many."""
        connection = self._connection()
        connection.execute("PRAGMA synchronous=NORMAL")
        cutoff = time.time() - self.retention_days * 86400
        # The newest max_queries stay: the oldest of them bounds what is deleted (read before taking the lock).
        kept = connection.execute("SELECT timestamp FROM queries ORDER BY timestamp DESC LIMIT 1 OFFSET ?",
                                  (self.max_queries - 1,)).fetchone()
        if kept is not None:
            cutoff = max(cutoff, kept[0])
        deleted = 0
        while True:
            connection.execute("BEGIN IMMEDIATE")
            try:
                batch = [row[0] for row in connection.execute(
                    "SELECT query_id FROM queries WHERE timestamp < ? ORDER BY timestamp LIMIT ?",
                    (cutoff, PRUNE_BATCH))]
                marks = ",".join("?" * len(batch))
                if batch:
                    connection.execute(f"DELETE FROM events WHERE query_id IN ({marks})", batch)
                    connection.execute(f"DELETE FROM queries WHERE query_id IN ({marks})", batch)
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            deleted += len(batch)
            if len(batch) < PRUNE_BATCH:
                break
        if deleted:
            logger.info("event store: %d queries past the retention (%g days, %d queries) deleted", deleted,
                        self.retention_days, self.max_queries)
        return deleted

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside see one state of the store (one read transaction on this thread's connection): an export
        or a click log never holds events of queries it does not hold, or the reverse."""
        connection = self._connection()
        connection.execute("BEGIN")
        try:
            yield
        finally:
            connection.execute("COMMIT")

    def queries(self, since: float = 0.0) -> Iterator[LoggedQuery]:
        cursor = self._connection().execute("SELECT * FROM queries WHERE timestamp >= ? ORDER BY timestamp", (since,))
        for row in cursor:
            yield _logged_query(row)

    def events(self, since: float = 0.0) -> Iterator[tuple]:
        """(event_id, timestamp, action_name, query_id, object_id, position, client_id, session_id, attributes)."""
        cursor = self._connection().execute("SELECT * FROM events WHERE timestamp >= ? ORDER BY event_id", (since,))
        for row in cursor:
            yield (*row[:8], json.loads(row[8]))

    def counts(self) -> dict[str, int]:
        connection = self._connection()
        return {"queries": connection.execute("SELECT count(*) FROM queries").fetchone()[0],
                "events": connection.execute("SELECT count(*) FROM events").fetchone()[0]}

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None


def add_reader_argument(p) -> None:
    """--events for the commands that read the page's log (export, judgments, interleaving verdicts)."""
    p.add_argument("--events", default=DEFAULT_PATH, help="the page's event store (its --events)")


def open_reader(p, path: str) -> EventStore:
    """The store at `path`, read-only; a missing one is the command line's error (argparse `p`), said plainly."""
    try:
        return EventStore(path, read_only=True)
    except FileNotFoundError:
        p.error(f"no event store at {path}: the page logs to its --events file")


def _logged_query(row: tuple) -> LoggedQuery:
    return LoggedQuery(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5], row[6], json.loads(row[7]),
                       row[8], row[9])
