"""The device as syncd understands it, parsed tolerantly from OpenApp's DeviceResponse.

The public spec and the live server disagree in places (CONTRACT.md §4): ``name`` arrives as
``{"en": ...}``, ``{"value": {...}}`` or a bare string; lifecycle timestamps arrive top-level,
inside the ``metadata`` string map, or both. Unknown fields are kept in ``raw``.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple
from urllib.parse import quote, quote_plus

import orjson
from xxhash import xxh3_128_hexdigest

from syncd.errors import InvalidDeviceError
from syncd.vocab import ChangeKind, ChangeSource, DeviceState

# What every device_changes row of a device kind (all but "restrictions") records of the device as
# it was after the change: enough to answer "what did the fleet look like at time T" from history.
HISTORY_FIELDS = ("state", "name", "zone_id", "integration_id", "external_id", "device_metadata")
LIFECYCLE_FIELDS = ("created_at", "updated_at", "deleted_at", "purge_at", "hard_delete_at")
# Per-request cache annotations: they change between identical reads, so they are not content.
VOLATILE_FIELDS = frozenset({"cache_hit", "cache_ttl"})
UNDETERMINED_LOCALE = "und"
# OpenApp issues device ids as ULIDs (CONTRACT.md §4) in canonical form: 26 characters of Crockford's
# base32 (digits and upper-case letters without I, L, O, U), the first one 0-7 (128 bits). Nothing
# else can be an OpenApp device, so nothing else is stored, put into a URL or pushed.
DEVICE_ID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")
ID_LENGTH = 64  # the mirror's id columns (org_id, integration_id, zone_id) are VARCHAR(64)
MAX_NESTING = 254  # the deepest JSON nesting orjson writes (it reads up to 1024)


# Bound once: looking up an enum's member costs more than the rest of Device.state, read per device.
_DELETED, _ACTIVE = DeviceState.DELETED, DeviceState.ACTIVE


def _lifecycle(index: int, doc: str) -> property:
    def get(device: Device) -> datetime | None:
        text = device.lifecycle[index]
        return None if text is None else datetime.fromisoformat(text).replace(tzinfo=UTC)

    return property(get, doc=doc)


@dataclass(slots=True)  # not frozen: frozen dataclasses are several times slower to build
class Device:
    """One device as mirrored: normalised columns plus the payload as received."""

    id: str
    org_id: str
    integration_id: str | None
    zone_id: str | None
    external_id: str | None
    name: dict[str, str]
    device_metadata: Any
    # credentials_set as received: JSON Pointers (the SDK's newer form) or a boolean (older payloads);
    # None when absent or neither. has_credentials reads either form.
    credentials_set: list[str] | bool | None
    # The LIFECYCLE_FIELDS as canonical UTC text (see utc_text): the form SQLite stores, kept as
    # text because formatting a datetime costs more than the rest of a device's parsing.
    lifecycle: tuple[str | None, ...]
    raw: dict[str, Any]
    raw_json: str  # ``raw`` serialised once; what the mirror stores
    fingerprint: str

    created_at = _lifecycle(0, "OpenApp's created_at, aware UTC.")
    updated_at = _lifecycle(1, "OpenApp's updated_at, aware UTC.")
    deleted_at = _lifecycle(2, "When OpenApp soft-deleted the device (None when it is not deleted).")
    purge_at = _lifecycle(3, "When OpenApp plans to purge the soft-deleted device.")
    hard_delete_at = _lifecycle(4, "When OpenApp plans to delete the device for good.")

    @property
    def has_credentials(self) -> bool | None:
        """Whether OpenApp holds a credential of the device (None: the payload does not say)."""
        if self.credentials_set is None:
            return None
        return bool(self.credentials_set)

    @property
    def state(self) -> DeviceState:
        """``deleted`` when OpenApp reports a soft delete, else ``active``."""
        return _DELETED if self.lifecycle[2] is not None else _ACTIVE


def encode(raw: dict[str, Any]) -> tuple[bytes, str]:
    """``(json, fingerprint)`` of a payload: its JSON, keys in the order received, and a 128-bit
    digest of that JSON without per-request cache annotations. One serialisation serves both when
    it can. The same content in another key order digests differently; a pass that meets such a
    device compares contents and renews the stored payload without recording a change.

    ValueError when the payload cannot be serialised (nested deeper than :data:`MAX_NESTING`).
    """
    try:
        encoded = orjson.dumps(raw)
        content = encoded
        if "cache_hit" in raw or "cache_ttl" in raw:  # VOLATILE_FIELDS, spelled out: this runs per device
            content = orjson.dumps({k: v for k, v in raw.items() if k not in VOLATILE_FIELDS})
    except orjson.JSONEncodeError:
        raise ValueError(f"its JSON is nested more than {MAX_NESTING} levels deep, deeper than syncd stores") from None
    return encoded, xxh3_128_hexdigest(content)


def is_entity_id(value: object) -> bool:
    """Whether ``value`` is an entity id (an apartment or listing a portal may let through). Entity
    ids follow the rule of device ids: OpenApp issues every id as a ULID, so anything else, in an
    answer or in an edit, is not an entity of OpenApp's."""
    return isinstance(value, str) and DEVICE_ID.fullmatch(value) is not None


def entity_id_problem(value: object) -> str | None:
    """Why ``value`` is not an entity id (one line, the value escaped and shortened), or None."""
    if is_entity_id(value):
        return None
    return f"{preview(value)} is not an entity id (a ULID: 26 characters of Crockford base32, upper case)"


def is_device_id(value: object) -> bool:
    """Whether ``value`` is a device id OpenApp could have issued (a canonical ULID)."""
    return isinstance(value, str) and DEVICE_ID.fullmatch(value) is not None


def check_device_id(value: object) -> str:
    """``value`` if it is an OpenApp device id, else ValueError saying so (the value escaped, shortened)."""
    if not is_device_id(value):
        raise ValueError(_not_an_id(value))
    assert isinstance(value, str)
    return value


def utcnow() -> datetime:
    """Aware UTC now."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class UnreadableItem:
    """A list item whose JSON could not be read on its own (the rest of its page could)."""

    reason: str
    device_id: str | None = None


def identify(item: object, position: int | None = None) -> tuple[str, str]:
    """Return ``(id, org_id)`` of a raw list item, or raise InvalidDeviceError naming the problem.

    The id must be one OpenApp can have issued (:data:`DEVICE_ID`); the org id a non-empty string.
    """
    if not isinstance(item, dict):
        if isinstance(item, UnreadableItem):
            raise InvalidDeviceError(item.reason, position=position, device_id=item.device_id)
        raise InvalidDeviceError(f"expected a JSON object, got {type(item).__name__}", position=position)
    device_id = item.get("id")
    if not isinstance(device_id, str) or not device_id:
        raise InvalidDeviceError("missing or empty 'id'", position=position)
    if DEVICE_ID.fullmatch(device_id) is None:
        raise InvalidDeviceError(f"'id' {_not_an_id(device_id)}", position=position)
    org_id = item.get("org_id")
    if not isinstance(org_id, str) or not org_id:
        raise InvalidDeviceError("missing or empty 'org_id'", position=position, device_id=device_id)
    return device_id, org_id


def parse_device(
    raw: object,
    position: int | None = None,
    encoded: tuple[bytes, str] | None = None,
    identity: tuple[str, str] | None = None,
) -> Device:
    """Parse one DeviceResponse; raise InvalidDeviceError (with its position and id) if it is unusable.

    Unusable includes what the mirror could not store alike on SQLite and PostgreSQL: a NUL character
    in any string, an id longer than its column, a timestamp outside the years 1-9999 once in UTC.
    ``encoded``: :func:`encode` of ``raw``, and ``identity``: :func:`identify` of it, when the caller
    already has them.
    """
    device_id, org_id = identity or identify(raw, position)
    assert isinstance(raw, dict)
    field = "payload"
    try:
        payload, digest = encoded or encode(raw)
        # Cheap tests first (a backslash is rare in a payload; memchr finds it fast), then the walk.
        if payload.find(b"\\") >= 0 and b"\\u0000" in payload:
            where = nul_path(raw)
            if where is not None:
                raise ValueError(
                    f"holds a NUL character (U+0000) at {where}; PostgreSQL cannot store one, so no database does"
                )
        storage = raw.get("metadata")
        if not isinstance(storage, dict):
            storage = {}
        lifecycle = []
        for field in LIFECYCLE_FIELDS:
            value = raw.get(field)
            if value is None:
                value = storage.get(field)
            lifecycle.append(None if value is None else utc_text(value))
        field = "name"
        name = normalise_name(raw.get("name"))
        field = "integration_id"
        integration_id = _id_field(raw.get(field))
        field = "zone_id"
        zone_id = _id_field(raw.get(field))
        field = "external_id"
        external_id = _optional_str(raw.get(field))
    except ValueError as exc:
        where = "" if field == "payload" else f"'{field}' "
        raise InvalidDeviceError(f"{where}{exc}", position=position, device_id=device_id) from None
    return Device(
        id=device_id,
        org_id=org_id,
        integration_id=integration_id,
        zone_id=zone_id,
        external_id=external_id,
        name=name,
        device_metadata=raw.get("device_metadata"),
        credentials_set=credentials_set(raw.get("credentials_set")),
        lifecycle=tuple(lifecycle),
        raw=raw,
        raw_json=payload.decode(),
        fingerprint=digest,
    )


def credentials_set(value: object) -> list[str] | bool | None:
    """``credentials_set`` in either form the API sends: a list of JSON Pointers naming write-only
    credential fields that hold a value, or a boolean. Anything else is not believed (None); the
    payload keeps it."""
    if isinstance(value, bool):
        return value
    if isinstance(value, list) and all(isinstance(pointer, str) for pointer in value):
        return value
    return None


@dataclass(frozen=True, slots=True)
class PageShape:
    """What paging needs of a list page read before: the ``digest`` of its body, how many items it
    held (``count``), the answer's ``total`` if it gave one, its first device's id."""

    digest: str
    count: int
    total: int | None
    first_id: str | None


@dataclass(frozen=True, slots=True)
class PageRecord:
    """A list page a pass compared whole with the mirror: at ``offset``, the ``shape`` of its body;
    every device on it was last seen at ``seen_since`` or later; ``summary``: what a later pass
    takes from it instead of reading it (its ids, active portals and integrations, encoded by
    :mod:`syncd.sync.unchanged`)."""

    offset: int
    shape: PageShape
    seen_since: datetime
    summary: bytes


PORTAL_KIND = "virtual_access_portal"  # device_metadata.kind of the only devices with door restrictions


@dataclass(slots=True)
class Inventory:
    """What a scan saw that the reads after it need: the active portals and the integrations."""

    portals: dict[str, str] = dataclasses.field(default_factory=dict)  # active portal id -> its fingerprint
    integrations: dict[str, str] = dataclasses.field(default_factory=dict)  # -> its lowest active device id
    # The portals noted since the last take_fresh(), for a reader that asks about them during the
    # scan; None: no such reader (nothing is kept twice).
    fresh: dict[str, str] | None = None

    def note(self, device_id: str, raw: dict[str, Any], fingerprint: str) -> None:
        """Take in an active device as listed (``raw``, with its :func:`encode` fingerprint)."""
        metadata = raw.get("device_metadata")
        if metadata.__class__ is dict and metadata.get("kind") == PORTAL_KIND:
            self.portals[device_id] = fingerprint
            if self.fresh is not None:
                self.fresh[device_id] = fingerprint
        integration = raw.get("integration_id")
        if integration.__class__ is str and 0 < len(integration) <= ID_LENGTH:
            self._integration(integration, device_id)

    def merge(self, portals: dict[str, str], integrations: dict[str, str]) -> None:
        """Take in what :meth:`note` took of other devices (another inventory's ``portals`` and
        ``integrations``)."""
        self.portals.update(portals)
        if self.fresh is not None:
            self.fresh.update(portals)
        for integration, device_id in integrations.items():
            self._integration(integration, device_id)

    def _integration(self, integration: str, device_id: str) -> None:
        known = self.integrations.get(integration)
        if known is None or device_id < known:
            self.integrations[integration] = device_id

    def take_fresh(self) -> dict[str, str]:
        """The portals noted since the last call (with their fingerprints); from now on, keep them."""
        fresh, self.fresh = self.fresh or {}, {}
        return fresh


# Door restrictions arrive under the public spec's key or the SDK's newer models' key (CONTRACT.md §9).
RESTRICTION_KEYS = ("apartment_entity_ids", "listing_entity_ids")
MAX_RESTRICTED_ENTITIES = 100_000  # per portal: more is a broken answer, not a building


@dataclass(frozen=True, slots=True)
class DoorRestrictions:
    """What get_door_restrictions said about one portal."""

    entity_ids: tuple[str, ...]  # sorted, each once; empty: the portal is not restricted
    key: str  # the body key that carried them (one of RESTRICTION_KEYS)
    raw: dict[str, Any]  # the answer as received


def parse_door_restrictions(body: object) -> DoorRestrictions:
    """Read a DoorRestrictionsResponse under either key; ValueError naming what is wrong with it."""
    if not isinstance(body, dict):
        raise ValueError(f"expected a JSON object, got {type(body).__name__}")
    present = [key for key in RESTRICTION_KEYS if key in body]
    if not present:
        raise ValueError(f"has neither {' nor '.join(RESTRICTION_KEYS)}")
    lists = [body[key] for key in present]
    for key, ids in zip(present, lists, strict=True):
        if not isinstance(ids, list):
            raise ValueError(f"{key} is not a list: {preview(ids)}")
        if len(ids) > MAX_RESTRICTED_ENTITIES:
            raise ValueError(f"{key} lists {len(ids)} entities, more than syncd believes ({MAX_RESTRICTED_ENTITIES})")
        for entity_id in ids:
            problem = entity_id_problem(entity_id)
            if problem:
                raise ValueError(f"{key} holds {problem}")
    if len(present) == 2 and set(lists[0]) != set(lists[1]):
        raise ValueError(f"{' and '.join(RESTRICTION_KEYS)} disagree")
    _check_storable(body)
    return DoorRestrictions(tuple(sorted(set(lists[0]))), present[0], body)


@dataclass(frozen=True, slots=True)
class MetadataDefinition:
    """What get_device_metadata_definition said: a provider's JSON Schema of ``device_metadata``."""

    provider_type: str
    schema: dict[str, Any] | bool
    fingerprint: str  # digest of the schema, key order aside: tells a changed schema
    raw: dict[str, Any]  # the answer as received (with the asked device's data and credentials_set)


def parse_metadata_definition(body: object) -> MetadataDefinition:
    """Read a DeviceMetadataDefinitionResponse; ValueError naming what is wrong with it."""
    if not isinstance(body, dict):
        raise ValueError(f"expected a JSON object, got {type(body).__name__}")
    provider = body.get("provider_type")
    if not (isinstance(provider, str) and 0 < len(provider) <= ID_LENGTH and provider.isprintable()):
        raise ValueError(f"provider_type {preview(provider)} is not a provider type")
    schema = body.get("schema")
    if not isinstance(schema, dict | bool):
        raise ValueError(f"schema is not a JSON Schema (an object or a boolean): {preview(schema)}")
    _check_storable(body)
    digest = xxh3_128_hexdigest(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS))
    return MetadataDefinition(provider, schema, digest, body)


def _check_storable(body: dict[str, Any]) -> None:
    """ValueError if an answer cannot be stored alike on both databases (as :func:`parse_device` checks)."""
    try:
        orjson.dumps(body)
    except orjson.JSONEncodeError:
        raise ValueError(f"it is nested more than {MAX_NESTING} levels deep, deeper than syncd stores") from None
    where = nul_path(body)
    if where is not None:
        raise ValueError(f"it holds a NUL character (U+0000) at {where}; PostgreSQL cannot store one")


def nul_path(value: Any) -> str | None:
    """Where the first NUL character is in a JSON value, or None: a path like ``name.en``,
    ``device_metadata[3]`` or ``device_metadata['odd key']``, safe to put into a one-line message."""
    pending: list[tuple[str, Any]] = [("", value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return (path or "the top level")[:100]
        elif isinstance(item, dict):
            for key, child in item.items():
                if "\x00" in key:
                    return f"a key in {path or 'the top level'}"[:100]
                plain = key.isascii() and key.replace("_", "").replace("-", "").isalnum()
                step = (f".{key}" if path else key) if plain else f"[{preview(key, 40)}]"
                pending.append((path + step, child))
        elif isinstance(item, list):
            pending.extend((f"{path}[{i}]", child) for i, child in enumerate(item))
    return None


def normalise_name(value: object) -> dict[str, str]:
    """Turn any accepted LocalizedString shape into a plain ``{locale: text}`` map."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {UNDETERMINED_LOCALE: value}
    if isinstance(value, dict):
        inner = value.get("value")
        if isinstance(inner, dict) and len(value) == 1:
            value = inner
        for locale, text in value.items():
            if not (isinstance(locale, str) and isinstance(text, str)):
                break
        else:
            return dict(value)
    raise ValueError(f"is not a localized string: {preview(value)}")


def parse_timestamp(value: object) -> datetime | None:
    """Parse an RFC 3339 timestamp to an aware UTC datetime (naive input is taken as UTC)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"is not a timestamp: {preview(value)}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"is not a timestamp: {preview(value)}") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:00:00-05:00 is in the year 10000 in UTC
        raise ValueError(f"is outside the years 1-9999 in UTC: {preview(value)}") from None


def utc_text(value: object) -> str | None:
    """An RFC 3339 timestamp as canonical UTC text, ``YYYY-MM-DD HH:MM:SS.ffffff`` (naive input is
    taken as UTC). This is how SQLite stores timestamps, and it sorts in time order."""
    # "YYYY-MM-DDTHH:MM:SS.ffffffZ", UTC with microseconds already (OpenApp's own form): check it,
    # then only swap the separator. (Cheaper than a regular expression; this runs twice a device.)
    if isinstance(value, str) and len(value) == 27 and value[26] == "Z" and value[4:20:3] == "--T::.":
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"is not a timestamp: {preview(value)}") from None
        return value.replace("T", " ", 1)[:26]
    moment = parse_timestamp(value)
    return None if moment is None else moment.replace(tzinfo=None).isoformat(" ", "microseconds")


def _optional_str(value: object) -> str | None:
    if value.__class__ is str and value:  # the common case first: this runs per device
        return value
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"is not a string: {preview(value)}")


def _id_field(value: object) -> str | None:
    if value.__class__ is str and 0 < len(value) <= ID_LENGTH:  # the common case first: this runs per device
        return value
    text = _optional_str(value)
    if text is not None and len(text) > ID_LENGTH:
        raise ValueError(f"is {len(text)} characters long, more than an id can be ({ID_LENGTH}): {preview(text)}")
    return text


def _not_an_id(value: object) -> str:
    return f"{preview(value)} is not an OpenApp device id (a ULID: 26 characters of Crockford base32)"


def preview(value: object, limit: int = 60) -> str:
    """``repr`` of a value, shortened: safe to put an untrusted value into a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(text: str, limit: int = 300) -> str:
    """Untrusted text as it may enter a message, a log line or a database column: every character
    that is not printable (line breaks, NUL, terminal escapes) escaped, and at most ``limit`` long."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


REDACTED = "********"  # what a credential value becomes wherever syncd shows or keeps it


def masked(text: str, secrets: Collection[str]) -> str:
    """``text`` with every secret replaced by :data:`REDACTED`, in each form a message may quote it
    (as it is, JSON- or ASCII-escaped, as ``repr`` or :func:`one_line` escapes it, HTML-escaped,
    percent-encoded), and a secret's beginning where a shortened text was cut before its end
    (followed by ``...``). Mask first, then shorten; this also catches text shortened before it got
    here. Linear in the text and the secrets' lengths."""
    forms: set[str] = set()
    for secret in secrets:
        if not secret:
            continue
        forms.update(
            {
                secret,
                orjson.dumps(secret).decode()[1:-1],
                json.dumps(secret)[1:-1],
                repr(secret)[1:-1],
                secret.encode("unicode_escape").decode("ascii"),
                html.escape(secret, quote=False),
                html.escape(secret),
                quote(secret, safe=""),
                quote_plus(secret, safe=""),
            }
        )
    ordered = sorted(forms, key=len, reverse=True)
    for form in ordered:
        if form in text:
            text = text.replace(form, REDACTED)
    if "..." not in text:
        return text
    # A cut: the end of the text before each "..." may be a secret's beginning.
    pieces = text.split("...")
    for n in range(len(pieces) - 1):
        for form in ordered:
            shortest = min(len(form), max(4, min(8, len(form) // 2)))
            end = _overlap(pieces[n][-len(form) :], form)
            if end >= shortest:
                pieces[n] = pieces[n][:-end] + REDACTED
    return "...".join(pieces)


def _overlap(tail: str, form: str) -> int:
    """The length of the longest beginning of ``form`` that ``tail`` ends with (Knuth-Morris-Pratt:
    linear, however long and repetitive the secret)."""
    fallback = [0] * len(form)
    k = 0
    for i in range(1, len(form)):
        while k and form[i] != form[k]:
            k = fallback[k - 1]
        if form[i] == form[k]:
            k += 1
        fallback[i] = k
    matched = 0
    for char in tail:
        while matched and (matched == len(form) or char != form[matched]):
            matched = fallback[matched - 1]
        if char == form[matched]:
            matched += 1
    return matched


def same_json(a: Any, b: Any) -> bool:
    """Whether two decoded JSON values are the same JSON value.

    Unlike ``==``: ``true`` is not ``1``; and numbers compare by decimal value, as JSON means them
    (PostgreSQL's jsonb gives ``4.8e16`` back as the integer 48000000000000000, which Python's float
    4.8e16 is not exactly equal to).
    """
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None or isinstance(a, str):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b or Decimal(repr(a)) == Decimal(repr(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(value, b[key]) for key, value in a.items())
    return False


def change_kind(old_state: str, new_state: str) -> ChangeKind:
    """The device_changes kind for a rewrite from ``old_state`` to ``new_state``."""
    if old_state == new_state:
        return ChangeKind.UPDATED
    return ChangeKind.DELETED if new_state == DeviceState.DELETED else ChangeKind.RESTORED


class HistoryRow(NamedTuple):
    """One ``device_changes`` row, its fields in the table's column order (a test holds the two
    together): what :meth:`syncd.store.PageWriter.add_history` writes. Built by :func:`history_row`
    only. A named tuple, not a frozen dataclass: a baseline pass builds one per device, and a frozen
    dataclass costs three times as much to build (and more than the dict it replaced)."""

    device_id: str
    org_id: str
    run_id: int | None
    observed_at: datetime
    change: ChangeKind
    diff: dict[str, Any] | None  # {field: {"old": ..., "new": ...}}; None for a first row
    source: ChangeSource  # local_edit when edit_id is set
    edit_id: int | None
    requested_by: str | None
    approved_by: str | None
    # The device after the change (HISTORY_FIELDS; all None on a "restrictions" row).
    state: str | None
    name: dict[str, str] | None
    zone_id: str | None
    integration_id: str | None
    external_id: str | None
    device_metadata: Any


_CHANGE_KINDS = frozenset(ChangeKind)  # a set: one lookup per row, a plain string included


def history_row(
    device_id: str,
    org_id: str,
    observed_at: datetime,
    change: ChangeKind,
    diff: dict[str, Any] | None,
    after: Device | Mapping[str, Any] | None,
    *,
    run_id: int | None = None,
    edit_id: int | None = None,
    provenance: Mapping[str, str | None] | None = None,
) -> HistoryRow:
    """One device_changes row: every history row is built here.

    ``after``: the device after the change, as parsed or as the mirror's :data:`HISTORY_FIELDS`
    (None only for ``restrictions``); ``edit_id``: the local edit whose push made the change (its
    row's source is ``local_edit``), and ``provenance`` its ``requested_by`` / ``approved_by``.
    """
    if change not in _CHANGE_KINDS:
        raise ValueError(f"unknown change kind {change!r}")
    if (after is None) != (change == ChangeKind.RESTRICTIONS):
        raise ValueError(f"a {str(change)!r} row {'records' if after is None else 'has no'} the device's values")
    if after is None:
        values: tuple[Any, ...] = (None,) * len(HISTORY_FIELDS)
    elif isinstance(after, Device):
        values = (
            after.state,
            after.name,
            after.zone_id,
            after.integration_id,
            after.external_id,
            after.device_metadata,
        )
    else:
        values = tuple(after[name] for name in HISTORY_FIELDS)
    by = provenance or {}
    return HistoryRow(
        device_id,
        org_id,
        run_id,
        observed_at,
        change,
        diff,
        ChangeSource.SYNC if edit_id is None else ChangeSource.LOCAL_EDIT,
        edit_id,
        by.get("requested_by"),
        by.get("approved_by"),
        *values,
    )


def describe_change(old: dict[str, Any], new: dict[str, Any], old_state: str, new_state: str) -> dict[str, Any]:
    """``{field: {"old": ..., "new": ...}}`` for every top-level payload field that changed."""
    diff = {
        key: {"old": old.get(key), "new": new.get(key)}
        for key in sorted((old.keys() | new.keys()) - VOLATILE_FIELDS)
        if not same_json(old.get(key), new.get(key))
    }
    if old_state != new_state:
        diff["state"] = {"old": old_state, "new": new_state}
    return diff
