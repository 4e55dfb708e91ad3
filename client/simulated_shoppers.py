"""SIMULATED shoppers: synthetic traffic through the real page API, with known behaviour, so that what is learned
from the logs (core/clickmodels.py, client/judgments.py) can be checked against the truth. Nothing here is a
real shopper; every client_id and session_id it sends starts with "simulated-", and its truth file says so.

    python -m client.simulated_shoppers --url http://127.0.0.1:8080 --sessions 2000 --out runs/simulation

A session: a shopper with an *intent* (article type, and maybe a colour and a gender) types a query, looks at
the 10 results, clicks some, maybe adds one to the cart, and may rephrase and search again. The page logs the
searches; the simulator posts the clicks to /api/events, as the page's own script does.

- Intents are (type, colour, gender) looks of the catalog with at least MIN_LOOK products, drawn by a Zipf law
  over a seeded random order of those looks: popularity unrelated to how many products a look has, where the
  training generator draws uniformly over products. A third of intents leave the colour out, a fifth the gender.
- Queries are phrased in PHRASINGS, shopper shorthand that neither the training generator's templates nor the
  evaluation sets' use (core/queries.py), and now and then with a dropped letter.
- Clicks follow the position-based model: position r is examined with probability EXAMINATION[r] =
  1 / r ** eta (known; position 1 always), and an examined product is clicked with its attractiveness,
  sigmoid(weights . (type matches, colour matches, gender fits, cheaper than its type's median) + appeal), where
  appeal is a product's own N(0, APPEAL_SD) draw (seeded by its id): attributes plus noise.
- True relevance, for evaluating what is learned: 2 when a product matches every attribute of the intent,
  1 when it matches the type and fits the gender but not the colour, else 0 (`Intent.grade`).
The truth file (truth.json in --out) records the examination probabilities, the weights and every query's
intent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.catalog import DEFAULT_CATALOG, read_catalog

logger = logging.getLogger("client.simulated_shoppers")

SIMULATED = "simulated"  # the prefix of every client_id and session_id the simulator sends
DEPTH = 10  # results a simulated shopper is shown (k) and may look at
MIN_LOOK = 5  # products a look needs to become an intent
ZIPF = 1.1  # intent popularity ~ 1 / rank ** ZIPF
ETA = 1.0  # examination 1 / r ** ETA
APPEAL_SD = 0.5
# Attractiveness weights: type matches, colour matches (or the intent names none), gender fits, cheaper than the
# median of its type; and the intercept.
WEIGHTS = {"type": 3.0, "colour": 2.0, "gender": 1.0, "cheaper": 0.3, "bias": -4.5}
CART_GIVEN_CLICK = 0.3  # an add_to_cart follows a click of a relevance-2 product this often (else a tenth of it)
REPHRASE = 0.5  # a session whose search got no click searches again, rephrased, this often
MAX_QUERIES = 3  # searches per session at most
TYPO = 0.08  # a query loses one letter this often

GENDER_SHORT = {"Men": ["mens", "men", "for him"], "Women": ["womens", "ladies", "for her"],
                "Boys": ["boys", "for a boy"], "Girls": ["girls", "for a girl"], "Unisex": ["unisex"]}
# A query names exactly what its intent does (a phrasing per combination), so each query stands for one intent.
PHRASINGS = (
    "{type} {colour} {gender}",
    "{gender} {type} {colour}",
    "{colour} {type} {gender}",
    "{type} {gender}",
    "{gender} {type}",
    "buy {colour} {type}",
    "{type} in {colour}",
    "{type} {colour}",
    "{type}",
    "cheap {type}",
)


@dataclass(frozen=True, order=True)
class Intent:
    article_type: str
    colour: str = ""  # "": any colour
    gender: str = ""  # "": any gender

    def grade(self, product: Mapping) -> int:
        """True relevance: 2 every attribute of the intent, 1 the type (and the gender) but another colour, 0."""
        if str(product.get("article_type", "")).lower() != self.article_type.lower() or not self.fits(product):
            return 0
        return 2 if not self.colour or str(product.get("base_colour", "")).lower() == self.colour.lower() else 1

    def fits(self, product: Mapping) -> bool:
        gender = str(product.get("gender", ""))
        return not self.gender or gender in (self.gender, "Unisex")


@dataclass
class ShopperModel:
    """The simulated behaviour: what the click model should recover (examination), and what relevance is."""

    examination: list[float]
    weights: dict[str, float]
    appeal_sd: float
    seed: int
    median_price: dict[str, float] = field(default_factory=dict)  # by article type

    @classmethod
    def make(cls, median_price: Mapping[str, float], seed: int, eta: float = ETA) -> ShopperModel:
        return cls([1.0 / r ** eta for r in range(1, DEPTH + 1)], dict(WEIGHTS), APPEAL_SD, seed, dict(median_price))

    def appeal(self, product_id: str) -> float:
        """A product's own appeal, the same in every session: N(0, appeal_sd) seeded by its id."""
        digest = hashlib.sha256(f"{self.seed}:{product_id}".encode()).digest()
        u1, u2 = (int.from_bytes(digest[:8], "big") + 1) / 2**64, int.from_bytes(digest[8:16], "big") / 2**64
        return self.appeal_sd * math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)

    def attractiveness(self, intent: Intent, product: Mapping, product_id: str) -> float:
        w = self.weights
        median = self.median_price.get(str(product.get("article_type", "")))
        price = product.get("price")
        score = (w["bias"] + w["type"] * (str(product.get("article_type", "")).lower() == intent.article_type.lower())
                 + w["colour"] * (not intent.colour
                                  or str(product.get("base_colour", "")).lower() == intent.colour.lower())
                 + w["gender"] * intent.fits(product)
                 + w["cheaper"] * (median is not None and price is not None and 0 <= price < median)
                 + self.appeal(product_id))
        return 1.0 / (1.0 + math.exp(-score))


def load_intents(catalog: str, seed: int, limit: int | None = None) -> tuple[list[Intent], list[float],
                                                                           dict[str, float]]:
    """The catalog's looks with MIN_LOOK products or more (among its first `limit`), their Zipf weights, and the
    median price per type."""
    df, _ = read_catalog(catalog, limit=limit)
    looks = df.groupby(["article_type", "base_colour", "gender"]).size()
    intents = sorted(Intent(t, c, g) for (t, c, g), n in looks.items() if n >= MIN_LOOK and t and c)
    random.Random(seed).shuffle(intents)
    weights = [1.0 / (rank + 1) ** ZIPF for rank in range(len(intents))]
    median = {str(t): float(p) for t, p in df[df["price"] >= 0].groupby("article_type")["price"].median().items()}
    return intents, weights, median


def draw_intent(intents: Sequence[Intent], weights: Sequence[float], rng: random.Random) -> Intent:
    """A shopper's intent: a look by the Zipf weights; a third of the time without its colour, a fifth without its
    gender."""
    intent = rng.choices(intents, weights)[0]
    if rng.random() < 1 / 3:
        intent = Intent(intent.article_type, "", intent.gender)
    if rng.random() < 1 / 5:
        intent = Intent(intent.article_type, intent.colour, "")
    return intent


def phrase(intent: Intent, rng: random.Random) -> str:
    """A shopper's query for the intent, in PHRASINGS (lowercase, maybe with a letter dropped)."""
    options = [p for p in PHRASINGS
               if ("{colour}" in p) == bool(intent.colour) and ("{gender}" in p) == bool(intent.gender)]
    gender = rng.choice(GENDER_SHORT.get(intent.gender, [intent.gender.lower()])) if intent.gender else ""
    kind = intent.article_type.lower()
    if kind.endswith("s") and rng.random() < 0.5:
        kind = kind[:-1]
    text = " ".join(rng.choice(options).format(type=kind, colour=intent.colour.lower(), gender=gender).split())
    if rng.random() < TYPO and len(text) > 6:
        i = rng.randrange(1, len(text) - 1)
        if text[i] != " ":
            text = text[:i] + text[i + 1:]
    return text


@dataclass
class Tally:
    sessions: int = 0
    searches: int = 0
    clicks: int = 0
    carts: int = 0
    failed: Counter = field(default_factory=Counter)  # by what failed
    queries: dict[str, dict] = field(default_factory=dict)  # user_query -> its intent (the truth)


class Simulation:
    """Sessions against one page; thread-safe tallies."""

    def __init__(self, url: str, intents: Sequence[Intent], weights: Sequence[float], model: ShopperModel,
                 seed: int, timeout_s: float = 10.0, mode: str = "hybrid"):
        self.url, self.intents, self.weights, self.model = url.rstrip("/"), list(intents), list(weights), model
        self.seed, self.timeout_s, self.mode = seed, timeout_s, mode
        self.tally = Tally()
        self._lock = threading.Lock()

    def _call(self, path: str, payload=None) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read())

    def session(self, number: int) -> None:
        """One shopper's visit, seeded by its number: the same sessions whatever the concurrency."""
        rng = random.Random(self.seed * 1_000_003 + number)
        intent = draw_intent(self.intents, self.weights, rng)
        client_id, session_id = f"{SIMULATED}-shopper-{self.seed}-{number}", f"{SIMULATED}-session-{self.seed}-{number}"
        for _ in range(MAX_QUERIES):
            text = phrase(intent, rng)
            params = urllib.parse.urlencode({"q": text, "k": DEPTH, "mode": self.mode, "client_id": client_id,
                                             "session_id": session_id})
            try:
                body = self._call(f"/api/search?{params}")
            except (urllib.error.URLError, OSError, ValueError) as exc:
                self._failed("search", exc)
                return
            events, clicked = [], False
            for position, hit in enumerate(body["hits"][:DEPTH], start=1):
                if rng.random() >= self.model.examination[position - 1]:
                    continue
                if rng.random() >= self.model.attractiveness(intent, hit["fields"], hit["product_id"]):
                    continue
                clicked = True
                event = {"action_name": "click", "query_id": body["query_id"], "object_id": hit["product_id"],
                         "position": position, "client_id": client_id, "session_id": session_id,
                         "event_attributes": {"simulated": True}}
                events.append(event)
                if rng.random() < CART_GIVEN_CLICK * (1.0 if intent.grade(hit["fields"]) == 2 else 0.1):
                    events.append({**event, "action_name": "add_to_cart"})
            if events and body["query_id"]:
                try:
                    self._call("/api/events", events)
                except (urllib.error.URLError, OSError, ValueError) as exc:
                    self._failed("events", exc)
                    return
            with self._lock:
                self.tally.searches += 1
                self.tally.clicks += sum(e["action_name"] == "click" for e in events)
                self.tally.carts += sum(e["action_name"] == "add_to_cart" for e in events)
                self.tally.queries.setdefault(text, asdict(intent))
            if clicked or rng.random() >= REPHRASE:
                break
        with self._lock:
            self.tally.sessions += 1

    def _failed(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self.tally.failed[what] += 1
            first = sum(self.tally.failed.values()) == 1
        if first:
            logger.warning("simulated %s failed: %s (counted; the run goes on)", what, exc)

    def run(self, sessions: int, concurrency: int = 4, start: int = 0, progress: bool = True) -> Tally:
        from tqdm import tqdm

        with ThreadPoolExecutor(concurrency) as pool, tqdm(total=sessions, disable=not progress,
                                                           desc="simulated sessions", unit="session") as bar:
            for _ in pool.map(self.session, range(start, start + sessions)):
                bar.update()
        return self.tally


def write_truth(path: Path, model: ShopperModel, tally: Tally, args: Mapping) -> None:
    truth = {"simulated": True, "examination": model.examination, "weights": model.weights,
             "appeal_sd": model.appeal_sd, "seed": model.seed, "depth": DEPTH, "run": dict(args),
             "sessions": tally.sessions, "searches": tally.searches, "clicks": tally.clicks, "carts": tally.carts,
             "failed": dict(tally.failed), "queries": tally.queries}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(truth, indent=1, sort_keys=True))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m client.simulated_shoppers", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the page whose API the shoppers use")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog the intents are drawn from (the page's)")
    p.add_argument("--limit", type=int, default=None,
                   help="intents from the catalog's first N products only (a page indexed with --limit N)")
    p.add_argument("--sessions", type=int, default=1000, help="shopper sessions to simulate")
    p.add_argument("--concurrency", type=int, default=4, help="sessions at once")
    p.add_argument("--seed", type=int, default=0, help="seeds the intents' order, the sessions and the appeal")
    p.add_argument("--start", type=int, default=0, help="number of the first session (to continue an earlier run)")
    p.add_argument("--eta", type=float, default=ETA, help="examination of position r is 1 / r ** eta")
    p.add_argument("--mode", default="hybrid", choices=("hybrid", "dense", "lexical"), help="the searches' mode")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds each call to the page may take")
    p.add_argument("--out", default="runs/simulation", help="folder of truth.json (behaviour and intents)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Tally:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    intents, weights, median = load_intents(args.catalog, args.seed, args.limit)
    model = ShopperModel.make(median, args.seed, args.eta)
    simulation = Simulation(args.url, intents, weights, model, args.seed, args.timeout, args.mode)
    started = time.perf_counter()
    tally = simulation.run(args.sessions, args.concurrency, args.start)
    seconds = time.perf_counter() - started
    write_truth(Path(args.out) / "truth.json", model, tally, vars(args))
    logger.info("SIMULATED: %d sessions, %d searches, %d clicks, %d add-to-carts in %.0f s (%.1f searches/s); "
                "failed: %s; truth in %s", tally.sessions, tally.searches, tally.clicks, tally.carts, seconds,
                tally.searches / max(seconds, 1e-9), dict(tally.failed) or "none", Path(args.out) / "truth.json")
    return tally


if __name__ == "__main__":
    main()
