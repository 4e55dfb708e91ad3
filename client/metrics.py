"""Prometheus metrics of the page and API: what an operator watches beside Triton's own (:8002).

One registry per app (tests start several apps in one process). Latency is per stage, so a slow
search says whether Triton (embed) or Milvus (search) is to blame; errors are counted by whose
fault they are; the served model's fingerprint is a label, so a dashboard shows when it changed.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: N811
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from client.encoder import resends

STAGES = ("queue", "embed", "search", "total")  # queue: waiting for a search slot (client/app.py MAX_SEARCHES)
ERROR_CLASSES = ("bad_input", "triton", "milvus", "overload", "event_store", "interleave", "internal")
POSITIONS = 20  # impressions and events are counted per position up to this; later ones share the label "21+"
# Seconds: a search here is ~5-25 ms on the CPU flavour; seconds-long ones are outages.
BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0)

__all__ = ["CONTENT_TYPE", "Metrics"]


class _Resends:
    """Requests sent again because an affected Triton corrupted them (client/encoder.py CORRUPTED): the
    process-wide count, read at each scrape."""

    def collect(self):
        yield CounterMetricFamily("mmsearch_triton_resends", "Requests sent again because Triton 2.51 answered "
                                  "them as if they held other bytes", value=resends())


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_Resends())
        self.latency = Histogram("mmsearch_stage_seconds", "Search latency by stage and query kind",
                                 ["stage", "kind"], buckets=BUCKETS, registry=self.registry)
        self.errors = Counter("mmsearch_errors_total", "Failed requests by whose fault",
                              ["error_class"], registry=self.registry)
        self.model = Gauge("mmsearch_model_info", "The model Triton serves (1 = current)",
                           ["fingerprint"], registry=self.registry)
        for stage in STAGES:  # exported from the start, so rate() works before the first search
            for kind in ("text", "image"):
                self.latency.labels(stage, kind)
        for error_class in ERROR_CLASSES:
            self.errors.labels(error_class)
        self.shown = Counter("mmsearch_impressions", "Results served, by position (1-based) and model",
                             ["position", "model"], registry=self.registry)
        self.actions = Counter("mmsearch_events", "Shoppers' events logged (UBI action_name), by position and model",
                               ["action", "position", "model"], registry=self.registry)
        self._fingerprint: str | None = None

    def observe(self, kind: str, embed_s: float, search_s: float, total_s: float) -> None:
        self.latency.labels("embed", kind).observe(embed_s)
        self.latency.labels("search", kind).observe(search_s)
        self.latency.labels("total", kind).observe(total_s)

    def queued(self, kind: str, seconds: float) -> None:
        self.latency.labels("queue", kind).observe(seconds)

    def error(self, error_class: str) -> None:
        self.errors.labels(error_class).inc()

    def impressions(self, model: str, served: int) -> None:
        for position in range(1, served + 1):
            self.shown.labels(_position(position), model).inc()

    def event(self, action: str, model: str, position: int) -> None:
        self.actions.labels(action, _position(position), model).inc()

    def served_model(self, fingerprint: str) -> None:
        if fingerprint != self._fingerprint:
            if self._fingerprint is not None:
                self.model.labels(self._fingerprint).set(0)
            self.model.labels(fingerprint).set(1)
            self._fingerprint = fingerprint

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _position(position: int) -> str:
    return str(position) if position <= POSITIONS else f"{POSITIONS + 1}+"
