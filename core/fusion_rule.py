"""The hybrid fusion rule: how much of a query's fused score comes from BM25, chosen per query from what the
BM25 list itself shows.

A query model set carries its own rule (the checkpoint config's "fusion_rule", exported as the ensembles'
parameter of that name); the shipped one is FusionRule(). The rule reads only the BM25 scores of the query's
lexical list, searched deeper than its `rare_hits` (every caller searches 100): BM25 is *confident* when

- its best score stands clear of its 10th (`confidence_ratio`: best / 10th, or the last when fewer), or
- its best stands clear of its 2nd (`lead_ratio`: one product holds a term the others lack), or
- it found fewer than `rare_hits` products (a rare token matched: a model code, a name),

and the confident query takes `confident_weight`, every other `base_weight`. A single hit is always confident.
The shipped rule uses the first test only; the others are off (lead_ratio inf, rare_hits 0) until a fit on
shoppers' judgments (client/fusion_fit.py) turns them on for a model set.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields


def confidence(scores: Sequence[float]) -> float:
    """The best BM25 score over the 10th best (or the last one); 0 without a hit, inf for a single hit."""
    if not scores or scores[0] <= 0:
        return 0.0
    last = scores[min(9, len(scores) - 1)]
    return math.inf if len(scores) == 1 or last <= 0 else scores[0] / last


def lead(scores: Sequence[float]) -> float:
    """The best BM25 score over the 2nd; 0 without a hit, inf for a single hit."""
    if not scores or scores[0] <= 0:
        return 0.0
    return math.inf if len(scores) == 1 or scores[1] <= 0 else scores[0] / scores[1]


@dataclass(frozen=True)
class FusionRule:
    base_weight: float = 0.35  # lexical weight for an ordinary query
    confident_weight: float = 0.5  # ... and when BM25 is confident
    confidence_ratio: float = 1.5  # best BM25 score / 10th best at which it is
    lead_ratio: float = math.inf  # best / 2nd at which it is (inf: not used)
    rare_hits: int = 0  # fewer BM25 hits than this and it is (0: not used)

    def __post_init__(self):
        for name in ("base_weight", "confident_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"fusion rule: {name} must be within [0, 1], not {getattr(self, name)}")
        for name in ("confidence_ratio", "lead_ratio"):
            if not getattr(self, name) >= 1.0:
                raise ValueError(f"fusion rule: {name} must be >= 1, not {getattr(self, name)}")
        if self.rare_hits < 0 or int(self.rare_hits) != self.rare_hits:
            raise ValueError(f"fusion rule: rare_hits must be a count >= 0, not {self.rare_hits}")

    def confident(self, scores: Sequence[float]) -> bool:
        """Whether BM25 is confident on a query with these BM25 scores (best first)."""
        if not scores or scores[0] <= 0:
            return False
        return (confidence(scores) >= self.confidence_ratio or lead(scores) >= self.lead_ratio
                or len(scores) < self.rare_hits)

    def weight(self, scores: Sequence[float]) -> float:
        """The lexical weight for a query whose BM25 list has these scores (best first)."""
        return self.confident_weight if self.confident(scores) else self.base_weight

    def to_json(self) -> str:
        """Compact JSON; an unused ratio (inf) is written as null."""
        return json.dumps({k: (None if v == math.inf else v) for k, v in asdict(self).items()},
                          separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, value: dict) -> FusionRule:
        """From a dict as to_json writes it (null: an unused ratio); unknown keys are an error, missing ones
        the shipped rule's."""
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"fusion rule: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        return cls(**{k: (math.inf if v is None else v) for k, v in value.items()})

    @classmethod
    def from_json(cls, text: str) -> FusionRule:
        return cls.from_dict(json.loads(text))


SHIPPED = FusionRule()


def ranking_model(fingerprint: str, rule: FusionRule | None) -> str:
    """What ranks a search: the query model's fingerprint, and its fusion rule where that is not the shipped one
    (hybrid rankings differ by rule, so evidence about one, an interleaving verdict, is not evidence about another
    with the same weights)."""
    if rule is None or rule == SHIPPED:
        return fingerprint
    return f"{fingerprint}+fusion-{hashlib.sha256(rule.to_json().encode()).hexdigest()[:8]}"
