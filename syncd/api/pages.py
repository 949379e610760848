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
from collections.abc import Callable, Iterator
from typing import Any, Literal

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
    scan = _Scan(tokens, is_object=opening.group() == b"{")
    for match in tokens:
        step = scan.take(match)
        if step == "closed" and not body[match.end() : end].strip():
            return scan.is_object, scan.spans
        if step != "more":
            return None  # out of place, or text after the end
    return None  # never closed


class _Scan:
    """The top level of one array or object, token by token: where each child starts and ends.

    An object's child is a key, then ':', then a value; an array's is a value. A value runs until
    the next ',' or the closing bracket; an array or object inside it is skipped whole (only its
    brackets count).
    """

    def __init__(self, tokens: Iterator[re.Match[bytes]], is_object: bool) -> None:
        self.tokens = tokens  # shared with the caller: a nested value's tokens are taken here
        self.is_object = is_object
        self.close = b"}" if is_object else b"]"
        self.first: _Expect = "key" if is_object else "value"
        self.expect: _Expect = self.first
        self.spans: list[Span] = []
        self.key: bytes | None = None
        self.child_start = self.child_end = -1

    def take(self, match: re.Match[bytes]) -> _Step:
        """One more token: ``more`` to go on, ``closed`` at the closing bracket, ``refused`` when
        the token cannot be where it is."""
        token = match.group()
        if match.lastgroup == "bad":
            return "refused"
        if token in (b",", self.close):
            return self._end_child(token)
        return _TAKE[self.expect](self, match)

    def _end_child(self, token: bytes) -> _Step:
        """A ',' or the closing bracket: the child before it is complete."""
        if self.child_start >= 0:
            self.spans.append((self.key, self.child_start, self.child_end))
        elif token == b"," or self.spans or self.expect != self.first:
            return "refused"  # an empty element: "[1,,2]", "[1,]", "{"a":}"
        if token == self.close:
            return "closed"
        self.key, self.child_start, self.expect = None, -1, self.first
        return "more"

    def _take_key(self, match: re.Match[bytes]) -> _Step:
        if match.lastgroup != "s":
            return "refused"
        self.key, self.expect = match.group(), "colon"
        return "more"

    def _take_colon(self, match: re.Match[bytes]) -> _Step:
        if match.group() != b":":
            return "refused"
        self.expect = "value"
        return "more"

    def _take_value(self, match: re.Match[bytes]) -> _Step:
        token = match.group()
        if token in _CLOSE or token == b":":
            return "refused"
        if self.child_start < 0:
            self.child_start = match.start()
        self.child_end = match.end()
        return self._skip_nested() if token in _OPEN else "more"

    def _skip_nested(self) -> _Step:
        """The tokens of an array or object inside a value, up to its closing bracket."""
        depth = 1
        for match in self.tokens:
            token = match.group()
            if match.lastgroup == "bad":
                return "refused"
            if token in _OPEN:
                depth += 1
            elif token in _CLOSE:
                depth -= 1
                if depth == 0:
                    self.child_end = match.end()
                    return "more"
        return "refused"  # never closed


_Expect = Literal["key", "colon", "value"]
_Step = Literal["more", "closed", "refused"]
_TAKE: dict[_Expect, Callable[[_Scan, re.Match[bytes]], _Step]] = {
    "key": _Scan._take_key,
    "colon": _Scan._take_colon,
    "value": _Scan._take_value,
}
