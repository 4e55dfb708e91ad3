"""Catalog images given as http(s) URLs: ImageFetcher's cache against a real local HTTP server serving
real catalog photos. A copy is served without a request within its TTL, revalidated after it (a 304
and no body when unchanged, the new bytes when replaced), served stale when the server cannot be asked,
and concurrent fetches of one URL all succeed. End to end: a replaced photo changes its product's
embed digest, so the sync re-embeds that product and only it. No sleeps: the clock is injected."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from core.catalog import ImageFetcher, read_catalog

TTL = ImageFetcher.max_age_s


@pytest.fixture(scope="module")
def jpegs(sample_csv) -> list[bytes]:
    """Real product photos (distinct JPEGs) from the sample catalog."""
    refs = pd.read_csv(sample_csv, dtype=str).image_url.iloc[:8]
    photos = [(sample_csv.parent / ref).read_bytes() for ref in refs]
    assert len(set(photos)) == len(photos) and all(p[:2] == b"\xff\xd8" for p in photos)
    return photos


@dataclass
class Photo:
    body: bytes
    etag: str | None
    last_modified: str | None
    truncate: bool = False  # announce the whole body, send half of it, hang up


class PhotoServer:
    """A ThreadingHTTPServer on 127.0.0.1 serving photos by path, honouring If-None-Match and
    If-Modified-Since, and recording every request and response."""

    def __init__(self):
        self.photos: dict[str, Photo] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path, request headers)
        self.responses: list[tuple[str, int, int]] = []  # (path, status, body bytes sent)
        self.barrier: threading.Barrier | None = None  # set: each request waits for the others
        self.status: int | None = None  # set: every request gets this error
        self.version = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def put(self, name: str, body: bytes, validators: str = "both", truncate: bool = False) -> Photo:
        """Serve (or replace) a photo; each version gets its own ETag and a later Last-Modified."""
        self.version += 1
        etag = f'"{hashlib.sha1(body).hexdigest()[:16]}"' if validators in ("both", "etag") else None
        modified = (formatdate(1_700_000_000 + 86400 * self.version, usegmt=True)
                    if validators in ("both", "last_modified") else None)
        self.photos[name] = Photo(body, etag, modified, truncate)
        return self.photos[name]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    def statuses(self) -> list[int]:
        return [status for _, status, _ in self.responses]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def reply(self, status: int, photo: Photo | None, body: bytes = b"") -> None:
                sent = body[: len(body) // 2] if photo is not None and photo.truncate else body
                with server.lock:  # recorded before the client can see the answer
                    server.responses.append((self.path, status, len(sent)))
                self.send_response(status)
                if photo is not None and photo.etag:
                    self.send_header("ETag", photo.etag)
                if photo is not None and photo.last_modified:
                    self.send_header("Last-Modified", photo.last_modified)
                if status != 304:
                    self.send_header("Content-Type", "image/jpeg" if status == 200 else "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(sent)

            def do_GET(self):
                with server.lock:
                    server.requests.append((self.path, dict(self.headers)))
                if server.barrier is not None:
                    server.barrier.wait(timeout=10)
                photo = server.photos.get(self.path.lstrip("/"))
                if server.status is not None or photo is None:
                    return self.reply(server.status or 404, None, b"no")
                match, since = self.headers.get("If-None-Match"), self.headers.get("If-Modified-Since")
                if match is not None:  # RFC 9110: If-None-Match wins over If-Modified-Since
                    unchanged = match == photo.etag
                else:
                    unchanged = bool(since and photo.last_modified and parsedate_to_datetime(since)
                                     >= parsedate_to_datetime(photo.last_modified))
                if unchanged:
                    return self.reply(304, photo)
                return self.reply(200, photo, photo.body)

        return Handler


@pytest.fixture()
def server():
    s = PhotoServer()
    yield s
    if s.thread.is_alive():
        s.stop()


class Clock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def fetcher(tmp_path, clock) -> ImageFetcher:
    return ImageFetcher(cache_dir=tmp_path / "cache", timeout_s=5, clock=clock)


def test_a_second_fetch_within_the_ttl_makes_no_request(server, fetcher, clock, jpegs):
    server.put("a.jpg", jpegs[0])
    assert fetcher(server.url("a.jpg")) == jpegs[0]
    clock.advance(TTL - 1)
    assert fetcher(server.url("a.jpg")) == jpegs[0]
    assert server.statuses() == [200]


@pytest.mark.parametrize("validators", ["etag", "last_modified"])
def test_after_the_ttl_a_conditional_get_gets_a_304_and_no_body(server, fetcher, clock, jpegs, validators):
    photo = server.put("a.jpg", jpegs[0], validators)
    fetcher(server.url("a.jpg"))
    clock.advance(TTL)
    assert fetcher(server.url("a.jpg")) == jpegs[0]
    headers = server.requests[1][1]
    if validators == "etag":
        assert headers["If-None-Match"] == photo.etag and "If-Modified-Since" not in headers
    else:
        assert headers["If-Modified-Since"] == photo.last_modified and "If-None-Match" not in headers
    assert server.responses[1] == ("/a.jpg", 304, 0)
    clock.advance(TTL - 1)  # the 304 restarted the TTL
    assert fetcher(server.url("a.jpg")) == jpegs[0]
    assert len(server.requests) == 2


@pytest.mark.parametrize("validators", ["both", "etag", "last_modified", "none"])
def test_a_replaced_photo_is_downloaded_by_the_next_revalidation(server, fetcher, clock, jpegs, tmp_path,
                                                                  validators):
    server.put("a.jpg", jpegs[0], validators)
    fetcher(server.url("a.jpg"))
    server.put("a.jpg", jpegs[1], validators)
    assert fetcher(server.url("a.jpg")) == jpegs[0]  # within the TTL: the cached copy, by design
    clock.advance(TTL)
    assert fetcher(server.url("a.jpg")) == jpegs[1]
    assert server.statuses() == [200, 200]
    conditional = {"If-None-Match", "If-Modified-Since"} & set(server.requests[1][1])
    assert bool(conditional) == (validators != "none")  # no validators: a plain GET again
    again = ImageFetcher(cache_dir=tmp_path / "cache", clock=clock)  # the new copy is what is cached
    assert again(server.url("a.jpg")) == jpegs[1] and len(server.requests) == 2


def test_concurrent_fetches_of_one_uncached_url_all_succeed(server, fetcher, jpegs, tmp_path, monkeypatch):
    """Every fetch is in flight at once (the server answers none until all have asked), and every
    writer has its file ready before any renames it into place: a shared temporary file would be
    renamed away under all but one of them."""
    n = 8
    server.put("a.jpg", jpegs[0])
    server.barrier = threading.Barrier(n)
    together = threading.Barrier(n)
    replace = os.replace

    def replace_together(src, dst):
        together.wait(timeout=10)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_together)
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda _: fetcher(server.url("a.jpg")), range(n)))
    assert results == [jpegs[0]] * n
    assert server.statuses() == [200] * n
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == ["", ".json"]  # no temporary left


@pytest.mark.parametrize("trouble", ["down", "503"])
def test_a_failed_revalidation_serves_the_stale_copy_with_one_warning(server, fetcher, clock, jpegs, tmp_path,
                                                                      caplog, trouble):
    server.put("a.jpg", jpegs[0])
    server.put("b.jpg", jpegs[1])
    fetcher(server.url("a.jpg"))
    fetcher(server.url("b.jpg"))
    sidecars = {p: p.read_text() for p in (tmp_path / "cache").glob("*.json")}
    if trouble == "down":
        server.stop()
    else:
        server.status = 503
    clock.advance(TTL)
    with caplog.at_level(logging.DEBUG, logger="core.catalog"):
        assert fetcher(server.url("a.jpg")) == jpegs[0]
        assert fetcher(server.url("b.jpg")) == jpegs[1]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot revalidate" in warnings[0].getMessage()
    assert {p: p.read_text() for p in sidecars} == sidecars  # not refreshed: the next fetch asks again


def test_without_a_cached_copy_an_unreachable_url_is_a_clear_error(server, fetcher, clock, jpegs):
    url = server.url("a.jpg")
    server.stop()
    with pytest.raises(ConnectionError, match=f"cannot download {url}.*offline"):
        fetcher(url)


def test_a_photo_gone_from_the_server_is_not_served_from_the_cache(server, fetcher, clock, jpegs):
    server.put("a.jpg", jpegs[0])
    fetcher(server.url("a.jpg"))
    del server.photos["a.jpg"]
    clock.advance(TTL)
    with pytest.raises(ConnectionError, match="404"):
        fetcher(server.url("a.jpg"))


def test_a_truncated_download_is_an_error_and_is_not_cached(server, fetcher, jpegs, tmp_path):
    server.put("a.jpg", jpegs[0], truncate=True)
    with pytest.raises(ConnectionError, match="truncated"):
        fetcher(server.url("a.jpg"))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_copy_without_its_own_sidecar_is_revalidated(server, fetcher, jpegs, tmp_path):
    """A cache written before sidecars existed, or bytes whose sidecar describes another copy."""
    server.put("a.jpg", jpegs[1])
    url = server.url("a.jpg")
    cached = tmp_path / "cache" / hashlib.sha1(url.encode()).hexdigest()
    cached.parent.mkdir()
    cached.write_bytes(jpegs[0])  # no sidecar
    assert fetcher(url) == jpegs[1]
    meta = json.loads(cached.with_name(cached.name + ".json").read_text())
    cached.write_bytes(jpegs[2])  # the sidecar now describes other bytes: its ETag must not be sent
    assert fetcher(url) == jpegs[1]
    assert server.statuses() == [200, 200] and "If-None-Match" not in server.requests[1][1]
    assert meta["etag"] == server.photos["a.jpg"].etag


def test_a_replaced_photo_changes_only_its_products_embed_digest(server, fetcher, clock, jpegs, sample_csv,
                                                                 tmp_path):
    """The sync's plan from a URL catalog, through the digests the indexer computes (no Triton needed):
    after the photo behind one URL is replaced, that product alone is to be embedded again."""
    from client import sync
    from client.index import Indexer

    n = 6
    src = pd.read_csv(sample_csv, dtype=str).iloc[:n]
    for i in range(n):
        server.put(f"{i}.jpg", jpegs[i])
    src = src.assign(image_url=[server.url(f"{i}.jpg") for i in range(n)])
    path = tmp_path / "catalog.csv"
    src.to_csv(path, index=False)
    df, report = read_catalog(path)
    rows, ids = df.to_dict("records"), list(df.product_id)
    assert report.products == n
    indexer = Indexer("127.0.0.1:1", "grpc", None, "products", concurrency=3)  # _digests uses no server

    before = indexer._digests(rows, fetcher, lexical=True)
    assert all(before[r["product_id"]][0] != sync.embed_digest(r, sync.MISSING_IMAGE) for r in rows)
    server.put("2.jpg", jpegs[6])
    assert sync.plan(indexer._digests(rows, fetcher, lexical=True), before).to_embed == set()  # within the TTL
    clock.advance(TTL)
    plan = sync.plan(indexer._digests(rows, fetcher, lexical=True), before)
    assert plan.changed == [ids[2]] and plan.to_embed == {ids[2]}
    assert sorted(plan.unchanged) == sorted(ids[:2] + ids[3:]) and not plan.updated and not plan.deleted
    assert sorted(server.statuses()[n:]) == [200] + [304] * (n - 1)  # revalidated: one body, five 304s

