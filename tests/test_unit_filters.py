"""client.filters: user values always become one quoted literal, whatever they hold; numeric ranges; empty
fields. (What Milvus makes of the rendered expressions is checked by test_search and test_hybrid.)"""

from __future__ import annotations

import pytest

from client.filters import FILTERS, _literal, filter_expression, render_filter

pytestmark = pytest.mark.unit

HOSTILE = [
    'Red" or price > 0 or base_colour == "',  # closes the literal and adds a clause
    "Red' or 1 == 1 or 'x",
    "back\\slash", "trailing\\", "\\", '"', '\\"', 'a\\"b', "\\u0041", "%s {0} ${x}",
    "{colour}",  # a placeholder inside a value is not filled again
    "ñandú", "日本語", "😀🔥👟", "e\u0301", "\u2028", "\ufeffbom", "tab\there", "nul\x00", "",
    ") or (price > 0",
    "x" * 10_000,
]


def read_literal(text: str) -> tuple[str, str]:
    """(value, rest) of the double-quoted literal `text` starts with, read as Milvus reads one: a backslash
    escapes the next character, an unescaped quote ends it."""
    assert text[0] == '"', text
    out, i = [], 1
    while text[i] != '"':
        if text[i] == "\\":
            assert text[i + 1] in '\\"', f"an escape Milvus Lite does not decode: {text[i:i + 2]!r}"
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out), text[i + 1:]


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_a_hostile_string_is_one_literal_of_exactly_that_value(value):
    expression = filter_expression({"colour": value})
    assert expression.startswith("base_colour == ")
    literal = expression.removeprefix("base_colour == ")
    assert read_literal(literal) == (value, "")  # nothing after the literal: no clause was added


def test_escaping_by_hand():
    assert _literal('say "hi"') == '"say \\"hi\\""'
    assert _literal("C:\\dir\\") == '"C:\\\\dir\\\\"'
    assert _literal("ñandú 😀") == '"ñandú 😀"'  # as written: Lite 2.5.1 decodes no \u escape (JSON's matched nothing)
    assert filter_expression({"colour": 'Red" or price > 0 or base_colour == "'}) == (
        'base_colour == "Red\\" or price > 0 or base_colour == \\""')


@pytest.mark.parametrize("value", ["two\nlines", "cr\rhere", "\r\n"])
def test_a_line_break_is_refused_not_sent(value):
    """Milvus's lexer ends a string at a raw line break (an error), and reads no \\n escape."""
    with pytest.raises(ValueError, match="line break"):
        filter_expression({"colour": value})


def test_non_string_literals():
    assert [_literal(v) for v in (True, False, 3, -2.5, 1e20, 0.1)] == ["true", "false", "3", "-2.5", "1e+20", "0.1"]
    assert _literal(["a", 'b"', 2]) == '["a", "b\\"", 2]'
    assert _literal(()) == "[]"
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="not a finite number"):
            _literal(bad)
    for unsupported in (None, {"a": 1}, b"bytes", object()):
        with pytest.raises(TypeError):
            _literal(unsupported)


def test_render_filter_fills_every_placeholder_once():
    assert render_filter("a == {x} or b == {x} and p >= {n}", {"x": "{n}", "n": 5}) == (
        'a == "{n}" or b == "{n}" and p >= 5')
    assert render_filter("no placeholders", {}) == "no placeholders"
    with pytest.raises(KeyError, match="{missing}"):
        render_filter("a == {missing}", {"other": 1})


def test_numeric_ranges():
    assert filter_expression({"min_price": "10", "max_price": 60}) == "price >= 10.0 and price <= 60.0"
    assert filter_expression({"max_price": 0.5}) == "price <= 0.5"
    assert filter_expression({"min_price": "-3"}) == "price >= -3.0"  # converted, not passed through
    assert filter_expression({"min_price": 50, "max_price": 10}) == "price >= 50.0 and price <= 10.0"  # empty range
    for text in ("abc", "10; drop", "", "1,5"):
        with pytest.raises(ValueError, match="min_price must be a float"):
            filter_expression({"min_price": text})
    for text in ("nan", "inf", "1e400"):  # floats Python reads, that no expression can hold
        with pytest.raises(ValueError, match="not a finite number"):
            filter_expression({"max_price": text})


def test_empty_fields_and_raw_expressions():
    assert filter_expression({}) == ""
    assert filter_expression({name: None for name in FILTERS}) == ""  # None: not set
    assert filter_expression({"colour": ""}) == 'base_colour == ""'  # "": no colour (the app sends None)
    assert filter_expression({"unknown_field": "x"}) == ""  # only FILTERS names are read
    assert filter_expression({}, raw="") == ""
    assert filter_expression({}, raw='usage == "Formal"') == 'usage == "Formal"'
    assert filter_expression({"gender": "Men"}, raw="price > 3 or price < 1") == (
        '(price > 3 or price < 1) and (gender == "Men")')


def test_filters_join_in_a_fixed_order():
    values = {"max_price": 9, "gender": "Women", "category": "Apparel", "colour": "Red"}
    assert filter_expression(values) == (
        'master_category == "Apparel" and base_colour == "Red" and gender == "Women" and price <= 9.0')
    every = filter_expression({name: "1" for name in FILTERS})
    assert every.count(" and ") == len(FILTERS) - 1
