"""The shoppers bench/service.py sends at the page: evaluation-set text queries and catalog photos, over HTTP.

Run by bench/service.py (`locust -f bench/locustfile.py --headless ...`), configured by environment variables:
    SVC_QUERIES      JSON file {"texts": [...], "photos": [paths of JPEGs]} (bench/service.py writes it)
    SVC_MODE         the text search mode (hybrid, dense, lexical); photos are always searched dense
    SVC_PHOTO_SHARE  the share of requests that are photo searches (0.2)
    SVC_RATE         0: closed loop (every user sends its next request as soon as the last is answered);
                     > 0: open loop at this many requests/s in all (users x a Poisson schedule each, see below)
    SVC_USERS        the number of users (the open loop divides SVC_RATE among them)
    SVC_REPORT       JSON file written at the end: the schedule's lateness and this process's CPU during the test
    SVC_STARTED      file touched when the test starts (bench/service.py takes its CPU snapshot then)
    SVC_STOPPED      file touched when the test stops (... and the one its cores-busy figures end at)
    SVC_SEED         seed of each user's query choice (users get SVC_SEED + their index)

Text: GET /api/search?q=...&mode=...; photo: POST /api/search/image (multipart, field `file`). A 200 whose
served mode is not the one asked for (a silent fallback to dense) counts as a failure.

Open loop. Each user keeps a Poisson schedule of its own (exponential gaps, mean SVC_USERS / SVC_RATE s) and sends
at the scheduled time, or at once when the previous answer came after it (a late arrival: for that user the loop
closed). With many users each idle most of the time, the sum is a Poisson arrival stream at SVC_RATE that does not
slow down when the server does, as long as there are users to spare; SVC_REPORT counts the late arrivals, so a
point says whether the approximation held. (locust's own constant_throughput paces each user from its previous
request without catching up, and users spawned together fire together: bursts rather than arrivals.)
"""

from __future__ import annotations

import itertools
import json
import os
import random
import resource
import time
import uuid
from pathlib import Path

import gevent
from locust import FastHttpUser, events, task
from locust.env import Environment
from locust.stats import CSV_STATS_INTERVAL_SEC

MODE = os.environ.get("SVC_MODE", "hybrid")
PHOTO_SHARE = float(os.environ.get("SVC_PHOTO_SHARE", "0.2"))
RATE = float(os.environ.get("SVC_RATE", "0"))
USERS = max(1, int(os.environ.get("SVC_USERS", "1")))
SEED = int(os.environ.get("SVC_SEED", "0"))
REPORT = os.environ.get("SVC_REPORT", "")
STARTED = os.environ.get("SVC_STARTED", "")
STOPPED = os.environ.get("SVC_STOPPED", "")
LATE_AFTER_S = 0.005  # a request sent this much after its scheduled time was held back by its own user

_queries = json.loads(Path(os.environ["SVC_QUERIES"]).read_text()) if os.environ.get("SVC_QUERIES") else {}
TEXTS: list[str] = _queries.get("texts", [])
BOUNDARY = uuid.uuid4().hex


def _multipart(path: str) -> bytes:
    """A ready-made multipart body (field `file`): built once, so a photo request costs locust no encoding."""
    data = Path(path).read_bytes()
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{Path(path).name}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


PHOTOS: list[bytes] = [_multipart(p) for p in _queries.get("photos", [])]
PHOTO_HEADERS = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
TEXT_MODE = f'"mode":"{MODE}"'.encode()
PHOTO_MODE = b'"mode":"dense"'

_users = itertools.count()
_schedule = {"arrivals": 0, "late": 0, "late_s_sum": 0.0, "late_s_max": 0.0}
_cpu: dict[str, float] = {}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def open_loop_wait(user: SearchUser) -> float:
    """Seconds until this user's next scheduled arrival (0 when it is already late)."""
    user.next_at += user.rng.expovariate(user.rate)
    lag = time.perf_counter() - user.next_at
    _schedule["arrivals"] += 1
    if lag > LATE_AFTER_S:
        _schedule["late"] += 1
        _schedule["late_s_sum"] += lag
        _schedule["late_s_max"] = max(_schedule["late_s_max"], lag)
    return max(0.0, -lag)


def closed_loop_wait(user: SearchUser) -> float:
    return 0.0


class SearchUser(FastHttpUser):
    """One shopper: a text query (or, SVC_PHOTO_SHARE of the time, a photo) per task."""

    wait_time = open_loop_wait if RATE > 0 else closed_loop_wait
    network_timeout = 60.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        index = next(_users)
        self.rng = random.Random(SEED + index)
        self.rate = RATE / USERS
        if RATE > 0:  # a random phase: users spawned together must not fire together
            self.next_at = time.perf_counter() + self.rng.expovariate(self.rate)
            gevent.sleep(max(0.0, self.next_at - time.perf_counter()))

    @task
    def search(self) -> None:
        if PHOTOS and self.rng.random() < PHOTO_SHARE:
            body = self.rng.choice(PHOTOS)
            with self.client.post("/api/search/image", data=body, headers=PHOTO_HEADERS, name="photo",
                                  catch_response=True) as response:
                self._check(response, PHOTO_MODE)
        else:
            query = self.rng.choice(TEXTS)
            with self.client.get("/api/search", params={"q": query, "mode": MODE}, name="text",
                                 catch_response=True) as response:
                self._check(response, TEXT_MODE)

    @staticmethod
    def _check(response, mode: bytes) -> None:
        if response.status_code != 200:
            reason = getattr(response, "error", None) or (response.text or "")[:200]
            response.failure(f"HTTP {response.status_code}: {reason}")
        elif mode not in (response.content or b""):
            response.failure(f"served another mode than {mode.decode()}")
        else:
            response.success()


@events.test_start.add_listener
def _started(environment: Environment, **_) -> None:
    _cpu["start"] = _cpu_s()
    _cpu["start_wall"] = time.time()
    for key in ("arrivals", "late"):
        _schedule[key] = 0
    _schedule["late_s_sum"] = _schedule["late_s_max"] = 0.0
    if STARTED:
        Path(STARTED).touch()


@events.test_stop.add_listener
def _stopped(environment: Environment, **_) -> None:
    if STOPPED:
        Path(STOPPED).touch()
    cpu = _cpu_s() - _cpu.get("start", 0.0)
    wall = time.time() - _cpu.get("start_wall", time.time())
    if REPORT:
        Path(REPORT).write_text(json.dumps({"cpu_s": cpu, "wall_s": wall, "schedule": _schedule, "users": USERS,
                                            "rate": RATE, "mode": MODE, "photo_share": PHOTO_SHARE}))
    # locust's CSV writer rewrites the stats file once a second and not at exit: waiting here (the users are
    # stopped) lets it write the final numbers, or the CSV would miss up to the last second of requests.
    gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.3)
