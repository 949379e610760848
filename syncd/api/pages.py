"""Reading a list_devices page, so that one bad device costs nothing but itself.

A page is read whole with orjson. When orjson refuses it (one device nested deeper than it reads,
invalid UTF-8 or a lone surrogate in one string, a number out of range), the page is split into
its items by a small scanner that only follows strings and brackets (no recursion, so no depth
limit), and each item is read alone: the readable ones are kept, each other one becomes an
:class:`~syncd.models.UnreadableItem` at its position. A body that is not even shaped like a JSON
array (or an ``{"items": [...]}`` envelope) is an :class:`InvalidResponseError`, as before.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from syncd.errors import InvalidResponseError
from syncd.models import UnreadableItem, is_device_id

# A JSON string, one structural character, a run of anything else (numbers, literals, garbage), or
# a quote that opens a string never closed. Possessive quantifiers: the engine keeps no backtracking
# state per character (a 15 MB string would otherwise cost gigabytes).
_TOKEN = re.compile(rb'(?P<s>"(?:[^"\\]++|\\.)*+")|(?P<p>[\[\]{}:,])|(?P<x>[^\s\[\]{}:,"]++)|(?P<bad>")', re.DOTALL)
_OPEN = (b"[", b"{")
_CLOSE = (b"]", b"}")

Span = tuple[bytes | None, int, int]  # (key token for object members, start, end) of one child


def read_page(body: bytes) -> tuple[list[Any], int | None]:
    """``(items, total)`` of a list_devices body: the spec's bare array, or ``{"items": [...], "total": N}``."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        salvaged = _salvage(body)
        if salvaged is None:
            raise InvalidResponseError("list_devices: the response body is not JSON") from None
        return salvaged
    if isinstance(data, list):
        return data, None
    if isinstance(data, dict) and isinstance(data.get("items"), list):
        return data["items"], _total(data.get("total"))
    raise InvalidResponseError(
        f"list_devices: expected a JSON array of devices (or {{items, total}}), got {type(data).__name__}"
    )


def _total(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _salvage(body: bytes) -> tuple[list[Any], int | None] | None:
    top = children(body, 0, len(body))
    if top is None:
        return None
    is_object, spans = top
    total = None
    if is_object:
        members = {_key(key): (start, end) for key, start, end in spans}
        if "items" not in members:
            return None
        start, end = members["items"]
        inner = children(body, start, end)
        if inner is None or inner[0]:
            return None
        spans = inner[1]
        if "total" in members:
            with_total = _load(body, *members["total"])
            total = _total(with_total) if not isinstance(with_total, UnreadableItem) else None
    return [_load(body, start, end, with_id=True) for _, start, end in spans], total


def _key(token: bytes | None) -> str | None:
    try:
        key = orjson.loads(token) if token is not None else None
    except orjson.JSONDecodeError:
        return None
    return key if isinstance(key, str) else None


def _load(body: bytes, start: int, end: int, with_id: bool = False) -> Any:
    """One item read alone, or an UnreadableItem saying why not (and the item's id when readable)."""
    try:
        return orjson.loads(body[start:end])
    except orjson.JSONDecodeError as exc:
        reason = f"is not readable JSON ({str(exc)[:120]})"
    return UnreadableItem(reason, _readable_id(body, start, end) if with_id else None)


def _readable_id(body: bytes, start: int, end: int) -> str | None:
    found = children(body, start, end)
    if found is None or not found[0]:
        return None
    for key, value_start, value_end in found[1]:
        if _key(key) == "id":
            value = _load(body, value_start, value_end)
            return value if is_device_id(value) else None
    return None


def children(body: bytes, start: int, end: int) -> tuple[bool, list[Span]] | None:
    """The top-level children of the JSON array or object in ``body[start:end]``.

    ``(is_object, spans)``, or None when the text is not shaped like one (brackets unbalanced, a
    string not closed, a key without a colon, text after the end). The children's own content is
    not checked: that is for the JSON reader, one child at a time.
    """
    tokens = _TOKEN.finditer(body, start, end)
    opening = next(tokens, None)
    if opening is None or opening.group() not in _OPEN:
        return None
    is_object = opening.group() == b"{"
    close = b"}" if is_object else b"]"
    spans: list[Span] = []
    depth = 1
    key: bytes | None = None
    child_start = child_end = -1
    expect = "key" if is_object else "value"  # at depth 1, in an object: key, then ':', then value
    for match in tokens:
        kind, token = match.lastgroup, match.group()
        if kind == "bad":
            return None
        if depth > 1:
            child_end = match.end()
            if token in _OPEN:
                depth += 1
            elif token in _CLOSE:
                depth -= 1
            continue
        if token in (b",", close):
            if child_start >= 0:
                spans.append((key, child_start, child_end))
            elif token == b"," or spans or expect != ("key" if is_object else "value"):
                return None  # an empty element: "[1,,2]", "[1,]", "{"a":}"
            if token == close:
                return (is_object, spans) if not body[match.end() : end].strip() else None
            key, child_start, expect = None, -1, "key" if is_object else "value"
            continue
        if expect == "key":
            if kind != "s":
                return None
            key, expect = token, "colon"
            continue
        if expect == "colon":
            if token != b":":
                return None
            expect = "value"
            continue
        if token in _CLOSE or token == b":":
            return None
        if child_start < 0:
            child_start = match.start()
        child_end = match.end()
        if token in _OPEN:
            depth += 1
    return None
