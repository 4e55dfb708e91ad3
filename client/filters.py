"""The filter language: structured filters (flag -> template) rendered into one Milvus expression.

User values never become expression syntax: each is written as a quoted literal. Milvus servers
2.5+ could take `filter_params` themselves, but Milvus Lite 2.5.1 (the demo's and the shared
server's engine) rejects templates, so the client renders them: one code path on every backend.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

# Structured filters: name (a CLI flag, a page field) -> (template, parameter type).
FILTERS: dict[str, tuple[str, type]] = {
    "category": ("master_category == {category}", str),
    "article_type": ("article_type == {article_type}", str),
    "colour": ("base_colour == {colour}", str),
    "gender": ("gender == {gender}", str),
    "usage": ("usage == {usage}", str),
    "min_price": ("price >= {min_price}", float),
    "max_price": ("price <= {max_price}", float),
}


def _literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"filter value {value} is not a finite number")
        return repr(value)
    if isinstance(value, str):
        # Double-quoted, only backslashes and quotes escaped, everything else as it is: Milvus Lite 2.5.1
        # decodes no other escape (JSON's "\u00f1and\u00fa" matched no "ñandú"), and its lexer refuses a raw
        # line break inside a string.
        if "\n" in value or "\r" in value:
            raise ValueError(f"filter value {value!r} holds a line break")
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    raise TypeError(f"unsupported filter value {value!r}")


def render_filter(template: str, params: Mapping[str, object]) -> str:
    """Fill `{name}` placeholders with safely quoted literals."""
    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in params:
            raise KeyError(f"filter placeholder {{{name}}} has no value")
        return _literal(params[name])

    return re.sub(r"\{(\w+)\}", replace, template)


def filter_expression(values: Mapping[str, object], raw: str | None = None) -> str:
    """A Milvus expression from FILTERS values (None = not set) and an optional raw expression.

    Raises ValueError when a value does not convert to its filter's type or cannot be written as a literal
    (a line break, a number that is not finite).
    """
    parts, params = [], {}
    for name, (template, kind) in FILTERS.items():
        value = values.get(name)
        if value is None:
            continue
        try:
            params[name] = kind(value)
        except ValueError:
            raise ValueError(f"{name} must be a {kind.__name__}, not {value!r}") from None
        parts.append(template)
    expression = render_filter(" and ".join(parts), params) if parts else ""
    if raw:  # a raw Milvus expression from the user, taken as written
        expression = f"({raw}) and ({expression})" if expression else raw
    return expression
