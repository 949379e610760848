"""Property-based tests of what crosses the API boundary: list pages, device payloads, the mirror.

Device payloads are generated (any Unicode, nesting, numbers, missing and extra fields, odd
timestamps), sent through the client's page reader and the parser into SQLite and PostgreSQL, and
read back: what the mirror accepts, it stores the same on both databases, and ``raw`` round-trips.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from syncd.api.pages import _salvage, read_page
from syncd.errors import InvalidDeviceError, InvalidResponseError
from syncd.models import (
    UnreadableItem,
    parse_device,
    parse_door_restrictions,
    parse_metadata_definition,
    parse_timestamp,
    same_json,
)
from syncd.simulator.world import make_ulid
from syncd.store import Store

from .conftest import postgres_admin_url

ORG = "01HORG00000000000000000000"
TYPED = ("org_id", "integration_id", "zone_id", "external_id", "name", "device_metadata", "state")
TIMES = ("created_at", "updated_at", "deleted_at", "purge_at", "hard_delete_at")

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson reads and writes as integers
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=16,
)
offsets = st.builds(lambda minutes: timezone(timedelta(minutes=minutes)), st.integers(-23 * 60 - 59, 23 * 60 + 59))
timestamps = st.one_of(
    st.none(),
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59), timezones=offsets).map(
        datetime.isoformat
    ),
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)).map(
        lambda d: d.strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # OpenApp's own form
    ),
    st.datetimes().map(lambda d: d.isoformat(" ")),  # naive: taken as UTC
    st.text(max_size=30),
    json_values,
)
names = st.one_of(
    st.text(max_size=20),
    st.dictionaries(st.text(max_size=5), st.text(max_size=20), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=20), max_size=3).map(lambda m: {"value": m}),
    json_values,
)
ids = st.one_of(st.none(), st.text(max_size=70), json_values)


@st.composite
def payloads(draw: st.DrawFn) -> dict[str, Any]:
    """A DeviceResponse-like object: the required id and org, anything else perhaps, perhaps odd."""
    payload: dict[str, Any] = {"id": "", "org_id": ORG}
    for field, values in [
        ("name", names),
        ("integration_id", ids),
        ("zone_id", ids),
        ("external_id", ids),
        ("device_metadata", json_values),
        *((field, timestamps) for field in TIMES),
        ("metadata", st.dictionaries(st.sampled_from(TIMES), timestamps, max_size=3) | json_values),
        ("credentials_set", st.booleans() | st.lists(st.text(max_size=10), max_size=2)),
    ]:
        if draw(st.booleans()):
            payload[field] = draw(values)
    payload.update(draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k not in payload), json_values)))
    return payload


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Store]]:
    """A mirror on SQLite, and on PostgreSQL when there is one."""
    urls = [f"sqlite:///{tmp_path_factory.mktemp('properties') / 'mirror.db'}"]
    admin = postgres_admin_url()
    name = f"syncd_prop_{random.getrandbits(40):010x}"
    if admin:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        urls.append(f"{admin.rpartition('/')[0]}/{name}")
    opened = [Store(url) for url in urls]
    for store in opened:
        store.upgrade()
    yield opened
    for store in opened:
        store.close()
    if admin:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def same_column(a: Any, b: Any) -> bool:
    """The same value in a typed JSON column. SQLite stores a column that is just a number as a
    number (NUMERIC affinity), exact there only as a double (README, "The mirror's schema")."""
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool) | isinstance(b, bool):
        return float(a) == float(b)
    return same_json(a, b)


_ids = (make_ulid(1_700_000_000_000 + n, random.Random(n)) for n in itertools.count())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=payloads())
def test_what_the_mirror_accepts_it_stores_alike_on_both_databases(
    stores: list[Store], payload: dict[str, Any]
) -> None:
    payload["id"] = next(_ids)
    body = b"[" + orjson.dumps(payload) + b"]"
    (item,), _ = read_page(body)
    try:
        device = parse_device(item, position=0)
    except InvalidDeviceError as exc:
        assert exc.position == 0 and exc.device_id == payload["id"]
        assert "\n" not in str(exc)
        event("refused")
        return
    event("stored")
    now = datetime.now(UTC)
    rows = []
    for store in stores:
        with store.writer() as writer:
            writer.insert_devices([device], now)
        row = store.device(device.id)
        assert row is not None
        rows.append(row)
    sent = orjson.loads(body)[0]
    storage = payload.get("metadata") if isinstance(payload.get("metadata"), dict) else {}
    for row in rows:
        assert same_json(row["raw"], sent)
        for field in TIMES:
            value = payload.get(field)
            assert row[field] == parse_timestamp(storage.get(field) if value is None else value)
    for field in TYPED:
        assert all(same_column(row[field], rows[0][field]) for row in rows), field
    for field in (*TIMES, "fingerprint"):
        assert all(row[field] == rows[0][field] for row in rows), field


@settings(max_examples=200, deadline=None)
@given(items=st.lists(json_values, max_size=8), envelope=st.booleans(), indent=st.booleans())
def test_the_page_splitter_reads_what_orjson_reads(items: list[Any], envelope: bool, indent: bool) -> None:
    document: Any = {"total": len(items), "items": items} if envelope else items
    body = orjson.dumps(document, option=orjson.OPT_INDENT_2 if indent else 0)
    assert _salvage(body) == (items, len(items) if envelope else None)


BAD_ITEMS = [
    b'{"id": "01HK153X0038NZ3ZA2MABNBN61", "name": "\xff\xfe"}',  # invalid UTF-8
    b'{"name": "\\udc00", "id": "01HK153X0038NZ3ZA2MABNBN61"}',  # a lone surrogate
    b'{"id": "01HK153X0038NZ3ZA2MABNBN61", "m": ' + b"[" * 3000 + b"]" * 3000 + b"}",  # too deep to read
    b'{"id": "01HK153X0038NZ3ZA2MABNBN61", "n": 1e999}',  # a number out of range
    b"NaN",
    b"[1 2]",
]


@settings(max_examples=200, deadline=None)
@given(
    items=st.lists(st.dictionaries(st.text(max_size=6), json_values, max_size=3), min_size=1, max_size=6),
    bad=st.sampled_from(BAD_ITEMS),
    where=st.integers(min_value=0),
)
def test_one_bad_item_costs_nothing_but_itself(items: list[Any], bad: bytes, where: int) -> None:
    position = where % (len(items) + 1)
    encoded = [orjson.dumps(i) for i in items]
    encoded.insert(position, bad)
    got, _ = read_page(b"[" + b",\n ".join(encoded) + b"]")
    assert isinstance(got[position], UnreadableItem)
    assert got[:position] + got[position + 1 :] == items


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_body_is_read_or_refused_never_crashes(body: bytes) -> None:
    try:
        items, _ = read_page(body)
    except InvalidResponseError:
        pass
    else:
        assert isinstance(items, list)


restriction_bodies = st.dictionaries(
    st.sampled_from(["apartment_entity_ids", "listing_entity_ids", "other"]),
    json_values | st.lists(st.text(max_size=70), max_size=6),
    max_size=3,
)


@settings(max_examples=300, deadline=None)
@given(body=restriction_bodies | json_values)
def test_door_restrictions_are_read_or_refused_in_one_line(body: Any) -> None:
    try:
        restrictions = parse_door_restrictions(body)
    except ValueError as exc:
        assert "\n" not in str(exc)
        return
    ids = restrictions.entity_ids
    assert list(ids) == sorted(set(ids)) and all(0 < len(i) <= 64 and i.isprintable() for i in ids)
    assert set(ids) == set(body[restrictions.key]) and restrictions.raw is body


definition_bodies = st.fixed_dictionaries(
    {"provider_type": st.text(max_size=70) | json_values, "schema": json_values},
    optional={"data": json_values, "credentials_set": json_values},
)


@settings(max_examples=300, deadline=None)
@given(body=definition_bodies | json_values)
def test_metadata_definitions_are_read_or_refused_in_one_line(body: Any) -> None:
    try:
        definition = parse_metadata_definition(body)
    except ValueError as exc:
        assert "\n" not in str(exc)
        return
    assert definition.schema is body["schema"] and len(definition.fingerprint) == 32
    reordered = (
        {**body, "schema": dict(reversed(list(body["schema"].items())))} if isinstance(body["schema"], dict) else body
    )
    assert parse_metadata_definition(reordered).fingerprint == definition.fingerprint  # key order aside
